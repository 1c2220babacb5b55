"""Device mesh and shardings for data-parallel training.

One code path for 1..N devices and 1..M hosts: a 1-D mesh over all devices
named "data"; batches are sharded along it, the train state is replicated.
`jax.jit` then inserts the gradient all-reduce itself (JAX's successor to
pmap). Each host feeds only its own slice of the global batch.
"""

import os
import socket
import sys
import threading
import time
from typing import Optional, Tuple

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vitat_jax.errors import UserError

DATA_AXIS = "data"


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name, "")
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"{name}={value!r} must be an integer") from None


def _host_device_count(environ) -> int:
  """The CPU devices JAX will make in this process: `JAX_NUM_CPU_DEVICES`
  (when >= 0), else the last `--xla_force_host_platform_device_count` in
  `XLA_FLAGS`, else 1."""
  try:
    count = int(environ.get("JAX_NUM_CPU_DEVICES", "-1") or -1)
  except ValueError:
    count = -1
  if count >= 0:
    return count
  count = 1
  for flag in environ.get("XLA_FLAGS", "").split():
    name, _, value = flag.partition("=")
    if name == "--xla_force_host_platform_device_count":
      try:
        count = int(value)
      except ValueError:
        pass
  return count


def cpu_thread_setting(environ, cores: int) -> Optional[int]:
  """The `PJRT_NPROC` that keeps several CPU devices free of a deadlock, or
  None when nothing needs setting.

  XLA:CPU runs the executions of a multi-device program and the dispatch of
  the next ones on one pool of max(cores, devices) threads. A dispatch that
  finds its device's 32 in-flight computations full blocks its thread; once
  the host is that far ahead (the train loop only waits at a log step), the
  oldest program can be left with fewer threads than devices, its
  all-reduce waits forever and the 40 s rendezvous termination timeout
  aborts the process (docs/parallel.md). With 2 x devices threads every
  blocked dispatch (at most one per device) still leaves one thread per
  device. Nothing is set where the cores already give that, where the user
  chose `PJRT_NPROC` or `NPROC`, or where JAX_PLATFORMS leaves out the CPU.
  """
  if "PJRT_NPROC" in environ or "NPROC" in environ:
    return None
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and "cpu" not in platforms.split(","):
    return None
  devices = _host_device_count(environ)
  if devices <= 1 or cores >= 2 * devices:
    return None
  return 2 * devices


def configure_cpu_threads(environ=None) -> Optional[int]:
  """Sets `cpu_thread_setting` in the environment (call it before JAX makes
  its CPU client: before anything asks for devices); returns what it set."""
  environ = os.environ if environ is None else environ
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 1
  threads = cpu_thread_setting(environ, cores)
  if threads is not None:
    environ["PJRT_NPROC"] = str(threads)
    logging.info(
        "PJRT_NPROC=%d: %d CPU devices on %d cores need 2 threads per "
        "device in XLA's CPU client pool (docs/parallel.md)", threads,
        threads // 2, cores)
  return threads


def _check_address(address: str) -> Tuple[str, int]:
  """(host, port) of `host:port`, or a one-line error."""
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f"--coordinator_address={address!r} must be host:port "
                    "(e.g. 10.0.0.2:1234): the address and a free port of "
                    "process 0's host")
  return host.strip("[]"), int(port)


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """Returns once process 0's port at `address` accepts connections; a
  one-line error after `timeout` seconds (JAX would wait, then abort)."""
  host, port = _check_address(address)
  deadline = time.monotonic() + timeout
  while True:
    try:
      socket.create_connection((host, port), timeout=5).close()
      return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserError(
            f"the coordinator {address} (process 0) cannot be reached after "
            f"{timeout:g} s ({e}): start process 0, check "
            "--coordinator_address, or wait longer with "
            "--coordinator_timeout") from None
      time.sleep(0.2)


def _join_watchdog(timeout: float, num_processes: int) -> threading.Timer:
  """Ends the process with a one-line error (exit code 2) if the join is not
  done after `timeout` s: JAX's join aborts in C++ with a stack trace, and
  waits for hosts given another --num_processes until then."""

  def expire():
    print(
        f"error: not every process joined within {timeout:g} s (this one "
        f"expects {num_processes}, --num_processes): start every host with "
        "the same --num_processes and --coordinator_address, or wait "
        "longer with --coordinator_timeout",
        file=sys.stderr,
        flush=True)
    os._exit(2)  # pylint: disable=protected-access

  timer = threading.Timer(timeout, expire)
  timer.daemon = True
  timer.start()
  return timer


def _check_same_num_processes(num_processes: int, process_id: int,
                              timeout: float) -> None:
  """A one-line error on every process when the hosts were given different
  --num_processes (the join can succeed: process 0's count wins), found
  through the coordinator's key-value store before anything else runs, so
  that every process stops at once rather than in its first collective."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  key = "vitat_jax/num_processes/{}".format
  client.key_value_set(key(process_id), str(num_processes))
  peers = range(1, jax.process_count()) if process_id == 0 else [0]
  counts = {
      int(client.blocking_key_value_get(key(i), int(timeout * 1000)))
      for i in peers
  } | {jax.process_count()}
  if counts != {num_processes}:
    others = ", ".join(str(c) for c in sorted(counts - {num_processes}))
    raise UserError(
        f"--num_processes={num_processes} here, but {others} on another host "
        f"(process 0 started a run of {jax.process_count()}): pass the same "
        "--num_processes to every host")


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           *,
                           auto: bool = False,
                           timeout: float = 120) -> bool:
  """Joins a multi-host run before anything else touches JAX; True if joined.

  Explicit values win, then the environment (JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID). With one process and no coordinator
  this does nothing, so single-host runs need no flag. `auto=True` lets JAX
  detect a managed cluster (Cloud TPU pods, SLURM, Open MPI) by itself.
  The join is bounded by `timeout` seconds (the coordinator reachable, then
  every process registered), each ending in one `error:` line, and a
  process count other than `num_processes` is refused.
  """
  coordinator_address = (coordinator_address or
                         os.environ.get("JAX_COORDINATOR_ADDRESS") or None)
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
  if auto and coordinator_address is None and num_processes is None:
    jax.distributed.initialize()
  elif coordinator_address is None and (num_processes or 1) == 1:
    return False
  else:
    if coordinator_address is None or num_processes is None or process_id is None:
      raise UserError(
          "a multi-process run needs the coordinator address (host:port), the "
          "number of processes and this process's id: pass all three flags "
          "(--coordinator_address, --num_processes, --process_id) or set "
          "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID")
    if not 0 <= process_id < num_processes:
      raise UserError(f"process_id={process_id} must be in [0, "
                      f"{num_processes})")
    _check_address(coordinator_address)
    if not timeout > 0:
      raise UserError(f"--coordinator_timeout={timeout} must be > 0 (seconds)")
    if process_id != 0:  # process 0 starts the coordinator itself
      _wait_for_coordinator(coordinator_address, timeout)
    watchdog = _join_watchdog(timeout, num_processes)
    try:
      jax.distributed.initialize(coordinator_address,
                                 num_processes,
                                 process_id,
                                 initialization_timeout=int(timeout) + 30)
    finally:
      watchdog.cancel()
    _check_same_num_processes(num_processes, process_id, timeout)
  logging.info("process %d of %d joined; %d local of %d devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def compute_dtype_for(name: str, platform: Optional[str] = None) -> str:
  """`name`, or for "auto" bfloat16 on GPU/TPU and float32 on the CPU (where
  bfloat16 matmuls are emulated and slower), with a log line saying so."""
  if name != "auto":
    return name
  platform = platform or jax.default_backend()
  chosen = "float32" if platform == "cpu" else "bfloat16"
  logging.info(
      "compute_dtype auto: %s on %s (normalisation and the patch "
      "embedding stay float32)", chosen, platform)
  return chosen


def make_mesh(num_devices: int = 0) -> Mesh:
  """The 1-D "data" mesh: every device (num_devices=0) or the first
  num_devices / process_count devices of every host."""
  present, hosts = jax.device_count(), jax.process_count()
  if not isinstance(num_devices, int) or num_devices < 0:
    raise UserError(f"num_devices={num_devices!r} must be 0 (every device) "
                    "or a positive integer")
  if num_devices > present:
    raise UserError(f"num_devices={num_devices} is more than the {present} "
                    f"devices present: use at most {present}, or 0 for all")
  if not num_devices or num_devices == present:
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))
  if num_devices % hosts:
    raise UserError(f"num_devices={num_devices} must be a multiple of the "
                    f"{hosts} processes (each host gives the same number)")
  per_host = num_devices // hosts
  devices = [
      d for p in range(hosts)
      for d in jax.local_devices(process_index=p)[:per_host]
  ]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int,
                     mesh: Mesh,
                     what: str = "batch_size"):
  """A batch the device count does not divide is an error, not a truncation."""
  devices = mesh.devices.size
  if global_batch_size % devices:
    raise UserError(f"{what}={global_batch_size} is not divisible by the "
                    f"{devices} devices: use a multiple of {devices}")


def shard_batch(mesh: Mesh, local_arrays):
  """Assembles each host's local slice into a global array sharded on "data"."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
      local_arrays)


def shard_global_batch(mesh: Mesh, global_arrays):
  """Shards a batch that every host holds in full (evaluation) along "data".

  Each device takes its own rows, so no host feeds more than its share.
  """
  sharding = batch_sharding(mesh)

  def put(a):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])

  return jax.tree.map(put, global_arrays)


def state_shardings(mesh: Mesh,
                    tree,
                    *,
                    fsdp: bool = False,
                    fsdp_min_size: int = 2**16):
  """The sharding of every leaf of a train state (arrays or shape structs).

  Replicated by default. With `fsdp`, a leaf of at least `fsdp_min_size`
  elements is split along "data" on its largest dimension that the device
  count divides (the first such, on ties); XLA then all-gathers it where
  the step uses it and reduce-scatters its gradient. A momentum buffer has
  its parameter's shape, hence its sharding.
  """
  devices = mesh.devices.size

  def rule(leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    if not fsdp or devices == 1 or int(np.prod(shape)) < fsdp_min_size:
      return replicated(mesh)
    divisible = [d for d in range(len(shape)) if shape[d] % devices == 0]
    if not divisible:
      return replicated(mesh)
    axis = max(divisible, key=lambda d: (shape[d], -d))
    spec = [None] * len(shape)
    spec[axis] = DATA_AXIS
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(rule, tree)


def with_shardings(abstract_tree, shardings):
  """Shape structs that carry their sharding (an orbax restore target)."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_tree, shardings)


def replicate(mesh: Mesh, tree):
  """Places a pytree (e.g. the train state) on every device of the mesh.

  Every process must pass the same values (they do: the state comes from
  the same seed or the same checkpoint on every host).
  """
  return jax.device_put(tree, replicated(mesh))


def to_host(tree):
  """NumPy copies of global arrays, gathered over processes when needed."""

  def gather(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(gather, tree)


def single_device_copy(tree):
  """Replicated (or sharded) arrays as this process's full copy on one of
  its devices.

  For host-driven code (AutoAttack gathers points on the host between its
  attacks): a jitted call with a replicated argument would otherwise run
  the whole batch once per device.
  """

  def local(x):
    if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
      if not x.is_fully_replicated:  # FSDP-sharded: gather it first
        x = jax.jit(lambda a: a,
                    out_shardings=NamedSharding(x.sharding.mesh, P()))(x)
      return x.addressable_data(0)
    return x

  return jax.tree.map(local, tree)


def merge_owned_rows(values: np.ndarray, owner: np.ndarray) -> np.ndarray:
  """Row i as process `owner[i]` holds it: merges host arrays of which each
  process computed its own rows (the identity in a single process)."""
  if jax.process_count() == 1:
    return values
  everything = np.asarray(multihost_utils.process_allgather(values))
  return everything[owner, np.arange(len(owner))]


def process_max(values: np.ndarray) -> np.ndarray:
  """The element-wise maximum of a small host array over processes."""
  if jax.process_count() == 1:
    return values
  return np.asarray(multihost_utils.process_allgather(values)).max(axis=0)


def agree(flag: bool) -> bool:
  """Process 0's `flag`, on every process (one decision for a multi-host
  run, e.g. a wall-clock checkpoint); the flag itself in one process."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, bool)))


def agree_value(value: float) -> float:
  """Process 0's number, on every process (e.g. a time stamp in a name)."""
  if jax.process_count() == 1:
    return value
  return float(
      multihost_utils.broadcast_one_to_all(np.asarray(value, np.float64)))


def first_signal(signum: Optional[int]) -> Optional[int]:
  """One stop decision for all hosts: the signal any process received (the
  largest number if several did), on every process, else None.

  Called at the log steps of a multi-host run (every step of a single
  process, where it costs nothing), so that a SIGTERM to any one host
  stops every host after the same step without a collective per step: the
  stop comes at most `log_every_steps` steps after the signal.
  """
  if jax.process_count() == 1:
    return signum
  got = int(process_max(np.asarray([signum or 0], np.int32))[0])
  return got or None


def barrier(name: str) -> None:
  """All processes wait here for each other (nothing in one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
