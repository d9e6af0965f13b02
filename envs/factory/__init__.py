"""Factory tasks: a Franka Panda at a conveyor workcell (pick-and-place, sorting, peg insertion)."""
