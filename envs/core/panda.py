"""Franka Emika Panda arm from ``pybullet_data``, driven by end-effector displacements through IK.

The model is ``pybullet_data/franka_panda/panda.urdf`` with each link's collision mesh replaced by its
convex hull (the shape PyBullet collides with anyway; loading takes half the time) and that hull also used
as the visual mesh: the stock visual meshes make PyBullet's CPU renderer about 7x slower (18 ms vs
2.5 ms per 84x84 frame, measured here) and carry no information a policy needs.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import math
import numbers
import operator
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pybullet as p
import pybullet_data

from loopsim.atomic import atomic_open
from loopsim.envs.core.sim import Simulation

__all__ = ["Panda", "panda_urdf_path"]


def _damped_gram_cholesky(jac: Sequence[Sequence[float]], damping_sq: float) -> list[list[float]]:
    """Lower Cholesky factor ``L`` of ``J J^T + lambda^2 I`` (``L L^T``; Golub & Van Loan 2013, alg. 4.2.1).

    Plain Python floats on purpose: every operation is rounded on its own, in a fixed order (each
    dot product of ``J``'s rows is ``math.fsum`` of the rounded products: their exact sum rounded
    once, whatever their order), so the result is the same on every CPU. NumPy's ``@`` and
    ``linalg.solve`` go through OpenBLAS, whose kernels (picked per CPU: AVX-512, AVX2, SSE3, ...)
    round the last bit differently; contact-rich episodes then drift apart.

    Args:
        jac: The Jacobian ``J``, ``m`` rows of ``n`` floats (here 6 x 7).
        damping_sq: ``lambda^2`` > 0, which makes the matrix positive definite; at a singular ``J``
            only if it stays well above the pivots' rounding errors (see :data:`DAMPING_RANGE`).

    Returns:
        ``L`` as ``m`` rows, row ``i`` holding its ``i + 1`` entries up to the diagonal.

    Raises:
        ValueError: From ``math.sqrt`` if the matrix is not numerically positive definite: with
            ``damping_sq <= 0``, or ``damping_sq`` near the rounding errors (~1e-15) at a singular
            ``J`` (a straight elbow with a damping of 1e-9 did it). :class:`Panda` accepts only
            dampings in :data:`DAMPING_RANGE`.
        ZeroDivisionError: Likewise, for a zero pivot.
    """
    mul, fsum, sqrt = operator.mul, math.fsum, math.sqrt
    chol: list[list[float]] = []
    for i, ji in enumerate(jac):
        row: list[float] = []
        for j in range(i):
            lj = chol[j]
            total = fsum(map(mul, ji, jac[j]))
            for a, b in zip(row, lj, strict=False):  # the first j entries (row has j so far)
                total -= a * b
            row.append(total / lj[j])
        total = fsum(map(mul, ji, ji)) + damping_sq
        for v in row:
            total -= v * v
        row.append(sqrt(total))
        chol.append(row)
    return chol


def _cholesky_solve(chol: Sequence[Sequence[float]], rhs: Sequence[float]) -> list[float]:
    """Solve ``L L^T y = b`` by forward and back substitution (``L`` from :func:`_damped_gram_cholesky`).

    Args:
        chol: Lower Cholesky factor, rows up to the diagonal.
        rhs: Right-hand side ``b``, ``m`` floats.

    Returns:
        ``y``, ``m`` floats.
    """
    m = len(chol)
    z: list[float] = []
    for i, li in enumerate(chol):
        total = rhs[i]
        for a, b in zip(li, z, strict=False):  # the first i entries (z has i so far)
            total -= a * b
        z.append(total / li[i])
    y = [0.0] * m
    for i in range(m - 1, -1, -1):
        total = z[i]
        for k in range(i + 1, m):
            total -= chol[k][i] * y[k]
        y[i] = total / chol[i][i]
    return y


#: Dampings ``lambda`` of the IK that :class:`Panda` accepts (inclusive). The computed Cholesky factor
#: of ``A = J J^T + lambda^2 I`` is exact for some ``A + dA`` with ``|dA| <= gamma_{n+1} |L| |L^T|``
#: (Higham 2002, "Accuracy and Stability of Numerical Algorithms", thm. 10.3; ``gamma_7`` ~ 7.8e-16
#: for n = 6), and ``(|L| |L^T|)_ij <= sqrt(a_ii a_jj)``: an entry moves by at most ~1e-15 times the
#: largest diagonal entry, a squared norm of a row of ``J`` plus ``lambda^2`` (under ~5 for the Panda:
#: at most 4.0 over 2000 random poses). ``lambda >= 1e-4`` (``lambda^2 >= 1e-8``) keeps a singular
#: ``J`` factorable with a margin of ~1e6; 1e-8 failed at a straight elbow in 2 of 3000 random poses,
#: 1e-9 in 418. Above 100 a step moves the end effector by less than ~4e-4 of its error
#: (``sigma^2 / (sigma^2 + lambda^2)``, ``sigma^2`` at most 4.1 over the same poses): no use, and
#: ``lambda^2`` stays far from overflow.
DAMPING_RANGE = (1e-4, 100.0)
#: Arm joint indices in the URDF (``panda_joint1`` .. ``panda_joint7``).
ARM_JOINTS = (0, 1, 2, 3, 4, 5, 6)
#: Finger joint indices (``panda_finger_joint1``, ``panda_finger_joint2``), prismatic, 0 .. 0.04 m each.
FINGER_JOINTS = (9, 10)
#: Link index of ``panda_grasptarget``: the point between the fingertips, our end effector.
EE_LINK = 11
#: Torque limits of the arm joints [N m], from the URDF ``<limit effort>``.
ARM_FORCES = (87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0)
#: Joint limits [rad] from the URDF, used for null-space IK.
ARM_LOWER = (-2.9671, -1.8326, -2.9671, -3.1416, -2.9671, -0.0873, -2.9671)
ARM_UPPER = (2.9671, 1.8326, 2.9671, 0.0, 2.9671, 3.8223, 2.9671)
#: A neutral, elbow-up configuration [rad] with the gripper pointing down.
NEUTRAL = (0.0, -0.4, 0.0, -2.4, 0.0, 2.0, 0.785)
#: Gripper pointing straight down, quaternion (x, y, z, w).
EE_DOWN = (1.0, 0.0, 0.0, 0.0)
#: Largest opening between the fingers [m] (two fingers, 0.04 m each).
MAX_WIDTH = 0.08
#: Height of the shoulder (joint 2 axis) above the base [m], from the URDF (0.333 m).
SHOULDER = 0.333
#: Height of the wrist centre above the grasp point when pointing down [m] (flange 0.107 m + hand 0.1034 m).
WRIST_OFFSET = 0.21
#: Largest shoulder-to-wrist distance at which the arm still points the gripper down [m]: IK converges
#: up to 0.79 m (measured on a grid); 0.75 m leaves a margin for gravity sag at full stretch.
MAX_WRIST_REACH = 0.75
#: Smallest horizontal distance of the grasp point from the base axis [m] (measured).
MIN_RADIUS = 0.28


#: Version of the generated model's text and manifest (bump when :func:`_generate` or the manifest
#: changes what it writes): part of the folder name, with a digest of the ``pybullet_data`` files it is
#: made from. 2: the manifest holds each file's SHA-256 besides its size.
_MODEL_VERSION = 2
#: Per process, once found or written: ``(folder, urdf path, ((file name, size in bytes), ...))``.
_MODEL: tuple[str, str, tuple[tuple[str, int], ...]] | None = None
#: This user's id (None where the OS has none): the shared folder must be owned by it.
_UID: int | None = os.getuid() if hasattr(os, "getuid") else None


def _hull_obj(path: Path) -> str:
    """Wavefront OBJ text of the convex hull of the mesh at ``path`` (vertices and outward triangles).

    PyBullet's URDF importer turns a non-concave collision mesh into a ``btConvexHullShape`` of the
    mesh's vertices (one per face corner, so each vertex several times) and then computes their
    hull: the collision shape is the hull whatever the file holds. Giving it the hull itself (scipy's
    ``ConvexHull``, i.e. Qhull) leaves the shape unchanged and cuts the Panda's load from ~9 ms to
    ~4.6 ms (measured here), which every reset pays. The output is canonical (vertices in the mesh file's
    order, each triangle starting at its smallest index, triangles sorted), so it depends on the hull
    only, not on the order Qhull returns it in.
    """
    from scipy.spatial import ConvexHull  # a dependency; imported here, used once per process

    lines = path.read_text().splitlines()
    all_verts = [[float(v) for v in line.split()[1:4]] for line in lines if line.startswith("v ")]
    # only the vertices some face uses (as PyBullet's importer; link6.obj has 24 loose ones)
    used = sorted({int(tok.split("/")[0]) - 1 for line in lines if line.startswith("f ")
                   for tok in line.split()[1:]})
    verts = np.array([all_verts[i] for i in used], dtype=np.float64)
    hull = ConvexHull(verts)
    order = np.unique(hull.simplices).tolist()  # in the mesh file's order
    index = {old: new for new, old in enumerate(order, start=1)}
    faces = []
    for tri, eq in zip(hull.simplices.tolist(), hull.equations, strict=True):
        a, b, c = (verts[i] for i in tri)
        if np.dot(np.cross(b - a, c - a), eq[:3]) < 0.0:  # wind counter-clockwise seen from outside
            tri = [tri[0], tri[2], tri[1]]
        f = [index[i] for i in tri]
        k = f.index(min(f))
        faces.append(tuple(f[k:] + f[:k]))
    out = [f"# convex hull of {path.name} (pybullet_data franka_panda), generated by loopsim"]
    out += ["v {!r} {!r} {!r}".format(*verts[i].tolist()) for i in order]
    out += ["f {} {} {}".format(*f) for f in sorted(faces)]
    return "\n".join(out) + "\n"


def _sources() -> tuple[Path, list[Path], str]:
    """``pybullet_data``'s Panda folder, its collision meshes and a digest of everything generated from."""
    src_dir = Path(pybullet_data.getDataPath()) / "franka_panda"
    meshes = sorted((src_dir / "meshes" / "collision").glob("*.obj"))
    h = hashlib.sha256(f"loopsim panda model {_MODEL_VERSION}".encode())
    for path in [src_dir / "panda.urdf", *meshes]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return src_dir, meshes, h.hexdigest()[:12]


def _generate(src_dir: Path, meshes: list[Path]) -> list[tuple[str, str]]:
    """``(file name, text)`` of the hull meshes and, last, of the URDF that names them."""
    text = (src_dir / "panda.urdf").read_text()
    files = [(f"hull_{m.name}", _hull_obj(m)) for m in meshes]
    for m in meshes:  # collision and visual geometry: the hull (what the physics collides with)
        for kind in ("visual", "collision"):
            text = text.replace(f"package://meshes/{kind}/{m.stem}.dae", f"hull_{m.name}")
            text = text.replace(f"package://meshes/{kind}/{m.name}", f"hull_{m.name}")
    if "package://" in text:  # pragma: no cover - a pybullet_data release with other meshes
        raise RuntimeError("panda.urdf of pybullet_data names meshes loopsim does not know")
    files.append(("panda.urdf", text))
    return files


def _own_folder(folder: str) -> bool:
    """Whether ``folder`` is a directory (not a symlink) owned by this user that no one else can write.

    The folder's name in the temp directory is predictable: another user could create it first (with
    a model of their own) or plant a symlink there. Only a folder this check accepts is read or written.
    """
    return _owned(folder, stat.S_ISDIR)


def _own_file(path: str) -> bool:
    """Whether ``path`` is a regular file (not a symlink) of this user that no one else can write.

    The folder check alone let another user rewrite a model file in place when the files had been
    written group- or world-writable (umask 002 or 000), manifest included.
    """
    return _owned(path, stat.S_ISREG)


def _owned(path: str, is_kind: Callable[[int], bool]) -> bool:
    """Whether ``path`` (not followed) is of the kind ``is_kind`` tests and only the user can write it."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not is_kind(st.st_mode):
        return False
    return _UID is None or (st.st_uid == _UID and not st.st_mode & 0o022)


def _write_model_file(path: str, text: str) -> None:
    """Write one model file atomically with mode 0644, whatever the umask (see :func:`_own_file`)."""
    with atomic_open(path, "w", mkdir=False) as f:
        os.fchmod(f.fileno(), 0o644)
        f.write(text)


def _present(folder: str, sizes: tuple[tuple[str, int], ...]) -> bool:
    """Whether ``folder`` holds every file of ``sizes`` with its size and is still the user's own.

    Plain strings and two kinds of ``stat``: runs every reset (~20 us; :func:`_own_folder` ~1 us of it).
    """
    try:
        return _own_folder(folder) and all(
            os.stat(os.path.join(folder, n)).st_size == size for n, size in sizes
        )
    except OSError:
        return False


def _verified_sizes(folder: str, manifest: str) -> tuple[tuple[str, int], ...]:
    """``((file name, size), ...)`` from the manifest if every file it lists has its size and SHA-256.

    Run once per process (~90 kB read): a file of the right size but other bytes (e.g. zeros left by
    a crash after the rename, which the per-reset size check cannot see) makes PyBullet drop a link's
    collision shape or refuse the URDF. Returns ``()`` for a missing, unreadable or unverified manifest.
    """
    try:
        if not _own_file(manifest):
            return ()
        with open(manifest) as f:
            entries = json.load(f)
        sizes = []
        for name, (size, sha) in entries.items():
            if os.path.basename(name) != name or not _own_file(os.path.join(folder, name)):
                return ()
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            if len(data) != int(size) or hashlib.sha256(data).hexdigest() != sha:
                return ()
            sizes.append((str(name), int(size)))
        return tuple(sizes)
    except (OSError, ValueError, TypeError, AttributeError):
        return ()


def panda_urdf_path() -> str:
    """Path of the Panda URDF loopsim loads, generated from ``pybullet_data``'s ``franka_panda``.

    Every link's collision mesh is replaced by its convex hull (the shape PyBullet collides with
    anyway, see :func:`_hull_obj`), which also serves as the visual mesh: the stock visual meshes make
    PyBullet's CPU renderer about 7x slower and carry no information a policy needs. The URDF and the
    hulls live in ``<tempdir>/loopsim-panda-<uid>-<digest>/``, the digest taken over the source files
    and the generator's version; they are generated (SciPy's Qhull) once per user, each file written
    atomically (concurrent processes are safe), then a manifest of their sizes and SHA-256 digests. A
    process checks every file against the manifest once; every call (every env reset rebuilds the
    scene) checks that the folder is still the user's own and each file there with its size (a temp
    cleaner may delete some), and generates them again when one is not. The folder is used only if it
    is a directory of this user that no one else can write (its name is predictable: another user could
    create it first or plant a symlink), and its files only if they are this user's and no one
    else can write them (they are written 0644 whatever the umask; others are written again);
    otherwise the model is generated into a private folder for
    this process (removed at exit), with a ``RuntimeWarning``.

    Returns:
        Absolute path of the generated URDF.

    Raises:
        OSError: If no temp directory is writable (the message says to set ``TMPDIR``), or writing
            the model fails.
    """
    global _MODEL
    if _MODEL is not None and os.path.dirname(_MODEL[0]) == tempfile.gettempdir():
        if _present(_MODEL[0], _MODEL[2]):
            return _MODEL[1]
    src_dir, meshes, digest = _sources()
    uid = 0 if _UID is None else _UID
    try:
        tmp = tempfile.gettempdir()
    except FileNotFoundError as exc:  # every candidate (TMPDIR, /tmp, /var/tmp, the cwd) read-only
        raise OSError(
            "loopsim writes the Panda model it loads (convex-hull meshes, ~90 kB) to a temp directory "
            f"and found none it can write ({exc}); set TMPDIR to a writable directory"
        ) from exc
    folder = os.path.join(tmp, f"loopsim-panda-{uid}-{digest}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o755)
    if not _own_folder(folder):  # made by someone else, a symlink, or writable by others
        private = tempfile.mkdtemp(prefix=f"loopsim-panda-{uid}-{digest}-")
        warnings.warn(
            f"{folder} is not a directory of this user that only it can write (another user's, a "
            f"symlink, or group/world-writable): loopsim does not trust the Panda model in it and "
            f"generates one for this process in {private} instead; remove {folder} to share the model "
            "between processes again",
            RuntimeWarning,
            stacklevel=2,
        )
        atexit.register(shutil.rmtree, private, ignore_errors=True)
        folder = private
    manifest = os.path.join(folder, "manifest.json")
    sizes = _verified_sizes(folder, manifest)
    if not sizes:  # first use, or files missing or damaged
        files = _generate(src_dir, meshes)
        for name, text in files:
            path = Path(folder) / name
            try:
                if _own_file(str(path)) and path.read_text() == text:
                    continue
            except (OSError, UnicodeDecodeError):
                pass  # missing, unreadable, damaged or writable by others: (re)write it
            _write_model_file(str(path), text)
        entries = {n: [len(t.encode()), hashlib.sha256(t.encode()).hexdigest()] for n, t in files}
        sizes = tuple((n, size) for n, (size, _) in entries.items())
        _write_model_file(manifest, json.dumps(entries, indent=1))
    _MODEL = (folder, os.path.join(folder, "panda.urdf"), sizes)
    return _MODEL[1]


class Panda:
    """The Panda arm with a parallel gripper, commanded in Cartesian space.

    Args:
        sim: The env's simulation.
        base_position: Position of the robot base (x, y, z) [m], world frame.
        max_displacement: End-effector displacement for an action of 1 [m per control step].
        workspace_low: Lower corner (x, y, z) [m] of the box the end-effector target is kept in, world
            frame; see :meth:`reachable` for the rest of the workspace.
        workspace_high: Upper corner (x, y, z) [m].
        damping: Damping of the least-squares IK step (``lambda`` in Buss 2004, "Introduction to
            inverse kinematics with Jacobian transpose, pseudoinverse and damped least squares
            methods", eq. 11): a real number (Python or NumPy; not a bool) in :data:`DAMPING_RANGE`,
            which keeps ``J J^T + lambda^2 I`` positive definite in floating point.
        null_gain: Gain of the null-space pull towards the neutral configuration [1/control step].

    Raises:
        ValueError: If ``damping`` is not a real number in :data:`DAMPING_RANGE`, checked as the float
            it is kept as (before anything is loaded).
    """

    def __init__(
        self,
        sim: Simulation,
        base_position: Sequence[float] = (0.0, 0.0, 0.0),
        max_displacement: float = 0.02,
        workspace_low: Sequence[float] = (0.0, -0.6, 0.01),
        workspace_high: Sequence[float] = (0.8, 0.6, 0.6),
        damping: float = 0.02,
        null_gain: float = 0.05,
    ) -> None:
        lo, hi = DAMPING_RANGE
        value = math.nan
        if isinstance(damping, numbers.Real) and not isinstance(damping, bool):
            with contextlib.suppress(OverflowError):  # an int beyond float's range
                value = float(damping)  # the value kept and used, so the one checked
        if not lo <= value <= hi:
            as_float = "" if math.isnan(value) or repr(value) == repr(damping) else f" (as a float {value!r})"
            raise ValueError(f"damping={damping!r}{as_float} must be a real number in [{lo:g}, {hi:g}] [-]")
        self.sim = sim
        bc = sim.bc
        self.body = bc.loadURDF(
            panda_urdf_path(),
            list(base_position),
            useFixedBase=True,
            flags=bc.URDF_ENABLE_CACHED_GRAPHICS_SHAPES,
        )
        self.max_displacement = float(max_displacement)
        self.damping = value
        self.null_gain = float(null_gain)
        self.workspace_low = np.asarray(workspace_low, dtype=np.float64)
        self.workspace_high = np.asarray(workspace_high, dtype=np.float64)
        for j in FINGER_JOINTS:
            bc.changeDynamics(self.body, j, lateralFriction=1.5, spinningFriction=0.01)
        for link, rgba in (
            [(-1, (0.9, 0.9, 0.9, 1))]
            + [(j, (0.9, 0.9, 0.92, 1)) for j in range(8)]
            + [(8, (0.15, 0.15, 0.15, 1)), (9, (0.2, 0.2, 0.2, 1)), (10, (0.2, 0.2, 0.2, 1))]
        ):
            bc.changeVisualShape(self.body, link, rgbaColor=list(rgba))
        for j, q in zip(ARM_JOINTS, NEUTRAL, strict=True):
            bc.resetJointState(self.body, j, q)
        # Couple the two fingers as the Panda's single gripper drive does (as in PyBullet's own Panda
        # example): two independent saturated finger motors let a held part float sideways in the grip.
        gear = bc.createConstraint(
            self.body,
            FINGER_JOINTS[0],
            self.body,
            FINGER_JOINTS[1],
            bc.JOINT_GEAR,
            [1.0, 0.0, 0.0],
            [0.0] * 3,
            [0.0] * 3,
        )
        bc.changeConstraint(gear, gearRatio=-1.0, erp=0.1, maxForce=50.0)
        cid = sim.id
        self._jacobian = functools.partial(
            p.calculateJacobian, self.body, EE_LINK, [0.0, 0.0, 0.0], physicsClientId=cid
        )
        self._arm_states = functools.partial(
            p.getJointStates, self.body, list(ARM_JOINTS) + list(FINGER_JOINTS), physicsClientId=cid
        )
        self._zeros = [0.0] * 9
        self._damping_sq = self.damping**2
        self._arm_joints = list(ARM_JOINTS)
        self._neutral: tuple | None = None  # end-effector kinematics at NEUTRAL, see reset_joints
        self._all_joints = list(ARM_JOINTS) + list(FINGER_JOINTS)
        self._forces = list(ARM_FORCES)
        self._base = [float(v) for v in base_position]
        self._ws_low = [float(v) for v in self.workspace_low]
        self._ws_high = [float(v) for v in self.workspace_high]
        self._motors = functools.partial(
            p.setJointMotorControlArray,
            self.body,
            list(ARM_JOINTS) + list(FINGER_JOINTS),
            p.POSITION_CONTROL,
            physicsClientId=cid,
        )
        self._link_state = functools.partial(
            p.getLinkState, self.body, EE_LINK, computeLinkVelocity=1, physicsClientId=cid
        )
        self._joint_states = functools.partial(
            p.getJointStates, self.body, list(FINGER_JOINTS), physicsClientId=cid
        )
        self._reset_joints = functools.partial(p.resetJointStatesMultiDof, self.body, physicsClientId=cid)
        self.read_state(forward_kinematics=True)

    def reset_joints(self, ee_position: Sequence[float], finger_width: float) -> None:
        """Teleport the arm so the end effector sits at ``ee_position`` pointing down, at rest.

        Args:
            ee_position: End-effector position (x, y, z) [m], world frame.
            finger_width: Opening between the fingers [m], in [0, 0.08].
        """
        half = finger_width / 2
        fingers = [half, half]
        self._reset_joints(self._all_joints, [[q] for q in NEUTRAL] + [[half], [half]])
        tx, ty, tz = (float(v) for v in np.asarray(ee_position, dtype=np.float64).tolist())
        # Joint positions are what was just written (PyBullet stores and returns the same doubles), so
        # only the end-effector pose is read back; plain floats, as these are 3-vectors. The pose and
        # the Jacobian at NEUTRAL depend on nothing else (the fixed base is restored with the scene,
        # the fingers are not on the chain to the end effector): computed once, reused at every reset.
        if self._neutral is None:
            self._read_kinematic_state(list(NEUTRAL) + fingers)
            lin, ang = self._jacobian(self.q_all, self._zeros, self._zeros)
            jac = tuple(tuple(row[:7]) for row in lin + ang)
            chol = tuple(tuple(row) for row in _damped_gram_cholesky(jac, self._damping_sq))
            self._neutral = (self.ee_pos_list, self._ee_quat, self.ee_vel_t, jac, chol)
        ee_pos, self._ee_quat, self.ee_vel_t, jac, chol = self._neutral
        self.ee_pos_list = ee_pos
        self.q_all = list(NEUTRAL) + fingers
        self.width = half + half
        for i in range(50):  # iterate the IK step on the kinematic state until it converges
            ex, ey, ez = self.ee_pos_list
            error = (tx - ex, ty - ey, tz - ez)
            q = self._ik_step(error, max_step=0.3) if i else self._ik_solve(jac, chol, error, 0.3)
            self._reset_joints(self._arm_joints, [[v] for v in q])
            self._read_kinematic_state(q + fingers)
            ex, ey, ez = self.ee_pos_list
            if max(abs(tx - ex), abs(ty - ey), abs(tz - ez)) < 1e-4:
                break
        self.command((0.0, 0.0, 0.0), finger_width, 40.0)

    def command(self, displacement, finger_width: float, gripper_force: float) -> None:
        """Set motor targets for one control step.

        Args:
            displacement: End-effector displacement (dx, dy, dz) [m], world frame (any sequence of 3
                floats); the target is the position read by the last :meth:`read_state` plus this,
                clipped to the workspace box.
            finger_width: Target opening between the fingers [m], in [0, 0.08].
            gripper_force: Force of each finger motor [N]; 0 means the gripper holds nothing (a fault).
        """
        # Plain floats: this runs every control step and the vectors are tiny.
        cx, cy, cz = self.ee_pos_list
        dx, dy, dz = displacement
        x, y, z = self.reachable(cx + dx, cy + dy, cz + dz)
        q = self._ik_step((x - cx, y - cy, z - cz))
        half = 0.5 * finger_width
        q += (half, half)
        self._motors(targetPositions=q, forces=self._forces + [gripper_force, gripper_force])

    def reachable(self, x: float, y: float, z: float) -> tuple[float, float, float]:
        """Project an end-effector target onto the workspace the arm can reach pointing down.

        The workspace is the box ``workspace_low``..``workspace_high``, outside a vertical cylinder of
        radius ``MIN_RADIUS`` around the base (the arm folds into itself there), with the wrist (the
        point ``WRIST_OFFSET`` above the grasp point) within ``MAX_WRIST_REACH`` of the shoulder
        (``SHOULDER`` above the base). The radii were measured here by solving IK on a grid: beyond
        them the arm cannot hold the gripper pointing down.

        Args:
            x: Target x [m], world frame (base frame: the base is unrotated).
            y: Target y [m].
            z: Target z [m].

        Returns:
            The nearest reachable target (x, y, z) [m] (the input itself when reachable).
        """
        lo, hi, b = self._ws_low, self._ws_high, self._base
        x = min(max(x, lo[0]), hi[0]) - b[0]
        y = min(max(y, lo[1]), hi[1]) - b[1]
        z = min(max(z, lo[2]), hi[2]) - b[2]
        rho = math.hypot(x, y)
        if rho < MIN_RADIUS:
            x, y = (MIN_RADIUS, 0.0) if rho < 1e-9 else (x * MIN_RADIUS / rho, y * MIN_RADIUS / rho)
        wz = z + WRIST_OFFSET - SHOULDER
        reach = math.sqrt(x * x + y * y + wz * wz)
        if reach > MAX_WRIST_REACH:
            k = MAX_WRIST_REACH / reach
            x, y, z = x * k, y * k, wz * k - WRIST_OFFSET + SHOULDER
        return x + b[0], y + b[1], z + b[2]

    def _ik_step(self, position_error, max_step: float | None = None) -> list[float]:
        """One damped-least-squares IK step from the configuration read by :meth:`read_state`.

        Solves ``dq = J^T (J J^T + lambda^2 I)^-1 e`` for the 6-D error ``e`` (position error and the
        orientation error towards ``EE_DOWN``, Siciliano et al. 2009, "Robotics", eq. 3.85), plus a
        null-space pull towards ``NEUTRAL`` that keeps the redundant joint away from its limits.

        Plain Python floats throughout (every operation rounded on its own in a fixed order, see
        :func:`_damped_gram_cholesky`), so the arm moves the same whatever BLAS kernels the CPU gets;
        this costs more per call than NumPy's matmul and LAPACK solve did, the Jacobian from PyBullet
        included: ~45 vs ~35 us on an AVX2 machine, 44 vs 19 us on an Intel Xeon with AVX-512 (tight
        loops, 2026-12-02), against 1-3.5 ms of physics per control step.

        Args:
            position_error: Target minus current end-effector position, 3 floats [m].
            max_step: Largest joint change [rad] per call (``None``: no limit beyond the joint limits).

        Returns:
            Target arm joint positions, 7 floats [rad], inside the joint limits.
        """
        lin, ang = self._jacobian(self.q_all, self._zeros, self._zeros)
        jac = [row[:7] for row in lin + ang]
        return self._ik_solve(jac, _damped_gram_cholesky(jac, self._damping_sq), position_error, max_step)

    def _ik_solve(
        self, jac: Sequence[Sequence[float]], chol: Sequence[Sequence[float]], position_error,
        max_step: float | None,
    ) -> list[float]:
        """The rest of :meth:`_ik_step`, given the arm Jacobian and a factor of ``J J^T + lambda^2 I``.

        Args:
            jac: The arm Jacobian of the end effector, 6 rows (linear, then angular) of 7 floats
                [m/rad, 1].
            chol: Its :func:`_damped_gram_cholesky` with ``lambda^2 = damping**2``.
            position_error: Target minus current end-effector position, 3 floats [m].
            max_step: Largest joint change [rad] (``None``: no limit beyond the joint limits).

        Returns:
            Target arm joint positions, 7 floats [rad], inside the joint limits.
        """
        q_all = self.q_all
        # Orientation error 0.5 * sum_i c_i x d_i, with c_i the columns of the current rotation R (the
        # entries r1 .. r7 of :attr:`ee_rot`, row-major) and d_i those of the target diag(1, -1, -1).
        x, y, z, w = self._ee_quat
        r1, r2, r3 = 2 * (x * y - z * w), 2 * (x * z + y * w), 2 * (x * y + z * w)
        r5, r6, r7 = 2 * (y * z - x * w), 2 * (x * z - y * w), 2 * (y * z + x * w)
        err = (*position_error, 0.5 * (r7 - r5), 0.5 * (r6 + r2), -0.5 * (r3 + r1))
        gain = self.null_gain
        q = q_all[:7]
        null = [gain * (rest - v) for rest, v in zip(NEUTRAL, q, strict=True)]
        # J^+ (e - J n) + n with J^+ = J^T (J J^T + lambda^2 I)^-1: one 6x6 solve with one right-hand side.
        mul, fsum = operator.mul, math.fsum
        rhs = [e - fsum(map(mul, row, null)) for e, row in zip(err, jac, strict=True)]
        sol = _cholesky_solve(chol, rhs)
        dq = [fsum(map(mul, col, sol)) for col in zip(*jac, strict=True)]
        out = []
        for i in range(7):  # q + dq, dq clipped to max_step, inside the joint limits (min(max(.)) order)
            d = dq[i] + null[i]
            if max_step is not None:
                d = -max_step if d < -max_step else max_step if d > max_step else d
            v = q[i] + d
            lo, hi = ARM_LOWER[i], ARM_UPPER[i]
            out.append(lo if v < lo else hi if v > hi else v)
        return out

    def _read_kinematic_state(self, q_all: list[float]) -> None:
        """:meth:`read_state` after teleporting the joints to ``q_all`` (9 floats [rad], [m]).

        Recomputes the link poses and reads the end effector only: the joint positions are the ones
        just written, which PyBullet returns unchanged.
        """
        s = self._link_state(computeForwardKinematics=1)
        self.ee_pos_list = s[4]
        self._ee_quat = s[5]
        self.ee_vel_t = s[6]
        self.q_all = q_all
        self.width = q_all[7] + q_all[8]

    def read_state(self, forward_kinematics: bool = False) -> None:
        """Read the robot state into ``ee_pos``, ``ee_vel``, ``ee_rot``, ``q``, ``width``.

        The env calls this after every physics update; ``ee_pos`` and ``ee_vel`` are ``(3,)`` float64
        [m], [m/s], world frame; ``ee_rot`` the end-effector rotation matrix (row-major, a flat 9-tuple);
        ``q`` the arm joint positions ``(7,)`` [rad]; ``width`` the finger opening [m].

        Args:
            forward_kinematics: Recompute link poses first (needed after teleporting joints; after a
                physics step PyBullet's link poses are already current).
        """
        s = self._link_state(computeForwardKinematics=int(forward_kinematics))
        self.ee_pos_list = s[4]
        self._ee_quat = s[5]
        self.ee_vel_t = s[6]
        q_all = [st[0] for st in self._arm_states()]
        self.q_all = q_all
        self.width = q_all[7] + q_all[8]

    @property
    def q(self) -> np.ndarray:
        """Arm joint positions [rad] read by the last :meth:`read_state`, ``(7,)`` float64."""
        return np.array(self.q_all[:7])

    @property
    def ee_rot(self) -> tuple[float, ...]:
        """End-effector rotation matrix read by the last :meth:`read_state`, row-major, a flat 9-tuple."""
        x, y, z, w = self._ee_quat
        return (
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        )  # fmt: skip

    @property
    def ee_pos(self) -> np.ndarray:
        """End-effector position (x, y, z) [m] read by the last :meth:`read_state`, ``(3,)`` float64."""
        return np.array(self.ee_pos_list)

    @property
    def ee_vel(self) -> np.ndarray:
        """End-effector linear velocity [m/s] read by the last :meth:`read_state`, ``(3,)`` float64."""
        return np.array(self.ee_vel_t)

    def ee_position(self) -> np.ndarray:
        """End-effector position (x, y, z) [m], world frame, ``(3,)`` float64, read from the simulator now."""
        return np.asarray(self._link_state(computeForwardKinematics=1)[4])

    def finger_width(self) -> float:
        """Current opening between the fingers [m]."""
        a, b = self._joint_states()
        return float(a[0] + b[0])
