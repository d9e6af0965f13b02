"""The simulation core shared by every domain: physics client, robot, sites, env base, experts."""
