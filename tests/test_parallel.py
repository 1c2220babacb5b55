"""Data parallelism: 8 devices and 2 hosts train and evaluate like one device.

XLA_FLAGS (the CPU device count) must be set before JAX starts, so every run
is a child process that trains a tiny model through `train.train_and_evaluate`
and writes its final parameters and its final evaluation (clean accuracy; on
two hosts also PGD), or runs AutoAttack on a fixed model
(`_autoattack_child`). The children of the runs started together are forks
of one `python -m tests.test_parallel --children` that imported JAX and the
library once, before any backend started (`_fork_children`); each sets its
own XLA_FLAGS, as a fresh process would.
"""

import argparse
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import traceback

import numpy as np
import pytest

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_STEPS = 4


def _config(eval_attacks=("clean",), fsdp=False):
  from tests import _tiny
  # Augmentation, Mixup/CutMix, ARD, PRM and drop-path all draw random
  # numbers from the global batch, so all of them are exercised here.
  return _tiny.config(
      **{
          "eval.attacks": tuple(eval_attacks),
          "eval.batch_size": 8,
          "fsdp": fsdp,
          "fsdp_min_size": 256,
          "num_devices": 4 if fsdp else 0,
          "data.train_examples": 160,
          "epochs": 1.0,
          "tricks.warmup_epochs": 1.0,
          "augment.crop_padding": 1,
          "augment.flip": True,
          "mixup.prob": 1.0,
          "model.drop_path_rate": 0.1,
          "eval.num_examples": 32,
          "eval.epoch_num_examples": 0,
          "log_every_steps": 2,
          "checkpoint_every_steps": 1000
      })


def _child(args):
  """Trains `_config()` in this process (joined to a cluster if asked)."""
  from vitat_jax import parallel
  if args.num_processes > 1:
    parallel.initialize_distributed(args.coordinator, args.num_processes,
                                    args.process_id)
  import jax
  from vitat_jax import checkpointing
  from vitat_jax import train
  import orbax.checkpoint as ocp
  assert jax.device_count() == args.devices, jax.devices()
  config = _config(args.eval_attacks.split(","), fsdp=args.fsdp == "on")
  if args.sigterm_process >= 0:
    result = _preempted_then_resumed(args, config)
  else:
    result = train.train_and_evaluate(config, args.workdir)
  assert result["steps"] >= _STEPS, result["steps"]
  if config.fsdp:  # resumes from the sharded checkpoint, nothing left to train
    again = train.train_and_evaluate(config, args.workdir)
    assert again["clean_acc"] == result["clean_acc"], (again, result)
  mngr = checkpointing.checkpoint_manager(args.workdir)
  params = mngr.restore(
      mngr.latest_step(),
      args=ocp.args.Composite(state=ocp.args.StandardRestore())).state["params"]
  if jax.process_index() == 0:
    flat = jax.tree_util.tree_flatten_with_path(parallel.to_host(params))[0]
    final = {
        f"final/{k}": np.asarray(v)
        for k, v in result.items()
        if k.endswith("_acc")
    }
    if config.fsdp:  # orbax restores each array with the sharding saved
      final["sharded_leaves"] = np.asarray(
          sum(not x.sharding.is_fully_replicated
              for x in jax.tree.leaves(params)))
    np.savez(args.out, **{jax.tree_util.keystr(k): v for k, v in flat}, **final)


def _preempted_then_resumed(args, config):
  """SIGTERM to process `args.sigterm_process` alone, during its second
  step: every process must stop after the same step with its checkpoint
  saved; then the same call again (the rerun) finishes the run."""
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from vitat_jax import parallel  # pylint: disable=g-import-not-at-top
  from vitat_jax import preemption  # pylint: disable=g-import-not-at-top
  from vitat_jax import train  # pylint: disable=g-import-not-at-top
  real_shard, calls, sent = parallel.shard_batch, [0], [0.0]

  def shard_and_signal(mesh, batch):
    calls[0] += 1
    if calls[0] == 2 and jax.process_index() == args.sigterm_process:
      sent[0] = time.time()
      os.kill(os.getpid(), signal.SIGTERM)
    return real_shard(mesh, batch)

  # The hosts agree on signals at log steps only: record the batch count at
  # every agreement (a collective), to show there is none in between.
  real_first_signal, checks = parallel.first_signal, []

  def counted_first_signal(signum):
    checks.append(calls[0])
    return real_first_signal(signum)

  parallel.shard_batch = shard_and_signal
  parallel.first_signal = counted_first_signal
  try:
    train.train_and_evaluate(config, args.workdir)
    raise AssertionError("the run was not stopped")
  except preemption.Preempted as e:
    stopped = {"step": e.step, "exit_code": e.exit_code, "at": time.time()}
  finally:
    parallel.shard_batch = real_shard
  stopped["saved"] = sorted(
      int(n)
      for n in os.listdir(os.path.join(args.workdir, "checkpoints"))
      if n.isdigit())
  stopped["signalled"] = sent[0]
  stopped["signal_checks"] = list(checks)
  checks.clear()
  calls[0] = 0
  parallel.shard_batch = lambda mesh, batch: (calls.__setitem__(
      0, calls[0] + 1), real_shard(mesh, batch))[1]
  try:
    result = train.train_and_evaluate(config, args.workdir)
  finally:
    parallel.shard_batch, parallel.first_signal = real_shard, real_first_signal
  stopped["resumed_signal_checks"] = list(checks)
  stopped["resumed_steps"] = result["steps"] - stopped["step"]
  with open(f"{args.out}.stop{jax.process_index()}.json", "w") as f:
    json.dump(stopped, f)
  return result


def _autoattack_child(args):
  """AutoAttack on a fixed MLP whose params are replicated over every
  device of the cluster; writes the robust flags, the adversarial images
  (of the rows this process holds) and the bytes it sent to other hosts."""
  from vitat_jax import parallel
  if args.num_processes > 1:
    parallel.initialize_distributed(args.coordinator, args.num_processes,
                                    args.process_id)
  import jax
  from jax.experimental import multihost_utils
  from tests.attacks import _models
  from vitat_jax import attacks
  from vitat_jax import evaluation
  assert jax.device_count() == args.devices, jax.devices()
  params = parallel.replicate(parallel.make_mesh(), {
      "w1": _models.W1,
      "w2": _models.W2
  })
  sent = []  # AutoAttack's host-to-host exchanges: process_allgather
  allgather = multihost_utils.process_allgather
  multihost_utils.process_allgather = lambda x, **kw: (sent.append(
      np.asarray(x).nbytes), allgather(x, **kw))[1]
  images, labels = _models.batch(0, n=40)
  result = attacks.autoattack(
      lambda p, x: jax.nn.relu(x.reshape(x.shape[0], -1) @ p["w1"]) @ p["w2"],
      jax.random.key(0),
      np.asarray(images),
      np.asarray(labels),
      params=params,
      eps=2 / 255,
      batch_size=8,
      verbose=False,
      placement=evaluation.autoattack_placement(),
      overrides={
          "apgd-ce": {
              "n_iter": 20
          },
          "apgd-t": {
              "n_iter": 20
          },
          "fab-t": {
              "n_iter": 20
          },
          "square": {
              "n_queries": 100
          }
      })
  if jax.process_index() == 0:
    np.savez(args.out,
             robust=result.robust,
             adv_images=result.adv_images,
             held=result.held,
             sent_bytes=np.asarray(sum(sent)),
             image_bytes=np.asarray(np.asarray(images).nbytes),
             **{
                 f"after {k}": v for k, v in result.robust_accuracy.items()
             })


def _launch(tmp_path,
            name,
            devices_per_process,
            num_processes=1,
            eval_attacks="clean",
            task="train",
            fsdp="off",
            sigterm_process=-1):
  """The child processes of one run; `_run_together` starts them."""
  # Cheap LLVM passes halve the compile time, which dominates these runs.
  xla_flags = (f"--xla_force_host_platform_device_count={devices_per_process} "
               "--xla_backend_optimization_level=0 "
               "--xla_llvm_disable_expensive_passes=true")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = tmp_path / f"{name}.npz"
  children = []
  for process_id in range(num_processes):
    argv = [
        "--devices",
        str(devices_per_process * num_processes), "--num_processes",
        str(num_processes), "--process_id",
        str(process_id), "--coordinator", f"127.0.0.1:{port}", "--workdir",
        str(tmp_path / name), "--out",
        str(out), "--eval_attacks", eval_attacks, "--task", task, "--fsdp",
        fsdp, "--sigterm_process",
        str(sigterm_process)
    ]
    children.append({
        "argv": argv,
        "env": {
            "XLA_FLAGS": xla_flags
        },
        "log": str(tmp_path / f"{name}.{process_id}.log")
    })
  return children, out


def _run_together(runs, tmp_path):
  """Runs the children of all `runs` ({name: _launch(...)}) at once, as
  forks of one parent; the final parameters of each run, by name."""
  children = [child for run, _ in runs.values() for child in run]
  spec = tmp_path / "children.json"
  spec.write_text(json.dumps(children))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for variable in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                   "JAX_PROCESS_ID", "XLA_FLAGS"):
    env.pop(variable, None)
  parent = subprocess.Popen(
      [sys.executable, "-m", "tests.test_parallel", "--children",
       str(spec)],
      cwd=_REPO_ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      start_new_session=True)
  try:
    parent_log = parent.communicate(timeout=300)[0]
  finally:
    if parent.poll() is None:  # the parent and every fork, at once
      os.killpg(parent.pid, signal.SIGKILL)
      parent.wait()
  assert parent.returncode == 0, parent_log[-4000:]
  codes = json.loads(pathlib.Path(f"{spec}.codes").read_text())
  for child, code in zip(children, codes):
    log = pathlib.Path(child["log"]).read_text()
    assert code == 0, f"exit status {code}\n{log[-4000:]}"
  results = {}
  for name, (_, out) in runs.items():
    with np.load(out) as params:
      results[name] = dict(params)
  return results


def _fork_children(spec_path):
  """Forks every child of the spec at once and waits for all of them;
  writes their exit statuses to `<spec>.codes`."""
  # Everything a child imports, once; no JAX backend may start before the
  # forks (each child's XLA_FLAGS is read when its backend starts).
  import jax  # pylint: disable=g-import-not-at-top,unused-import
  import orbax.checkpoint  # pylint: disable=g-import-not-at-top,unused-import
  from sklearn import datasets  # pylint: disable=g-import-not-at-top,unused-import
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  from vitat_jax import attacks  # pylint: disable=g-import-not-at-top,unused-import
  from vitat_jax import parallel  # pylint: disable=g-import-not-at-top,unused-import
  from vitat_jax import train  # pylint: disable=g-import-not-at-top,unused-import
  assert not xla_bridge._backends, "a JAX backend started before the forks"  # pylint: disable=protected-access
  children = json.loads(pathlib.Path(spec_path).read_text())
  pids = []
  for child in children:
    pid = os.fork()
    if pid == 0:
      code = 1
      try:
        fd = os.open(child["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.environ.update(child["env"])
        args = _parser().parse_args(child["argv"])
        {"train": _child, "autoattack": _autoattack_child}[args.task](args)
        code = 0
      except BaseException:  # pylint: disable=broad-except
        traceback.print_exc()
      finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # pylint: disable=protected-access
    pids.append(pid)
  codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
  pathlib.Path(f"{spec_path}.codes").write_text(json.dumps(codes))


def _assert_close(actual, expected):
  assert actual.keys() == expected.keys()
  for key in expected:
    np.testing.assert_allclose(actual[key],
                               expected[key],
                               rtol=1e-4,
                               atol=1e-5,
                               err_msg=key)


@pytest.fixture(scope="module")
def single_host_runs(tmp_path_factory):
  """1 device, 8 devices, and FSDP on 4 of 8 devices, started together
  (each is mostly single-threaded compilation)."""
  root = tmp_path_factory.mktemp("runs")
  return _run_together(
      {
          "one": _launch(root, "one", 1),
          "eight": _launch(root, "eight", 8),
          "fsdp": _launch(root, "fsdp", 8, fsdp="on")
      }, root)


def test_eight_devices_match_one_device(single_host_runs):
  _assert_close(single_host_runs["eight"], single_host_runs["one"])


def test_fsdp_on_four_of_eight_devices_matches_one_device(single_host_runs):
  # config.num_devices=4: a mesh of the first 4 of the 8 devices present.
  fsdp = dict(single_host_runs["fsdp"])
  # The patch embedding, qkv, proj and MLP kernels at least.
  assert int(fsdp.pop("sharded_leaves")) >= 5
  _assert_close(fsdp, single_host_runs["one"])


def test_two_hosts_match_one_process_and_stop_together_on_one_sigterm(tmp_path):
  # Training, then the final clean and PGD evaluation with the batches
  # sharded over all devices of both hosts. "preempted": the same two-host
  # run, SIGTERM to host 1 only during its second step, then resumed.
  runs = _run_together(
      {
          "single":
              _launch(tmp_path, "single", 4, eval_attacks="clean,pgd3"),
          "multi":
              _launch(tmp_path,
                      "multi",
                      2,
                      num_processes=2,
                      eval_attacks="clean,pgd3"),
          "preempted":
              _launch(tmp_path,
                      "preempted",
                      2,
                      num_processes=2,
                      eval_attacks="clean,pgd3",
                      sigterm_process=1)
      }, tmp_path)
  multi, single = runs["multi"], runs["single"]
  assert {"final/clean_acc", "final/pgd3_acc"} <= set(single)
  _assert_close(multi, single)
  stops = [
      json.loads((tmp_path / f"preempted.npz.stop{i}.json").read_text())
      for i in range(2)
  ]
  # Both hosts stopped after the step the signal landed in, with exit
  # status 0 and that step's checkpoint saved, within seconds.
  assert [s["step"] for s in stops] == [2, 2], stops
  assert [s["exit_code"] for s in stops] == [0, 0]
  assert all(2 in s["saved"] and max(s["saved"]) == 2 for s in stops), stops
  assert max(s["at"] for s in stops) - stops[1]["signalled"] < 60, stops
  # No collective per step: the hosts agreed on signals once, at the log
  # step 2, and in the resumed run at its log steps only (every 2 steps,
  # counted in batches read since the resume, and the last step).
  assert [s["signal_checks"] for s in stops] == [[2], [2]], stops
  for s in stops:
    resumed = s["resumed_steps"]
    assert s["resumed_signal_checks"] == [
        n for n in range(1, resumed + 1)
        if (n + s["step"]) % 2 == 0 or n == resumed
    ], s
  # Resumed, they finish with the parameters of the uninterrupted run.
  _assert_close(runs["preempted"], multi)


@pytest.fixture(scope="module")
def autoattack_runs(tmp_path_factory):
  """AutoAttack on 1, 8 and 4 devices of one process, and on 2 processes x
  2 devices, started together."""
  root = tmp_path_factory.mktemp("aa")
  return _run_together(
      {
          "one":
              _launch(root, "one", 1, task="autoattack"),
          "eight":
              _launch(root, "eight", 8, task="autoattack"),
          "four":
              _launch(root, "four", 4, task="autoattack"),
          "two_hosts":
              _launch(root, "two_hosts", 2, num_processes=2, task="autoattack")
      }, root)


def test_autoattack_on_eight_devices_matches_one_device(autoattack_runs):
  one, eight = autoattack_runs["one"], autoattack_runs["eight"]
  # Neither all robust nor all broken, else a lost point would not show.
  assert 0.1 < one["after square"] < 0.9, one["after square"]
  assert one["after apgd-ce"] < one["after clean"]
  np.testing.assert_array_equal(eight["robust"], one["robust"])
  # The same attack breaks each point at the same place, up to the float
  # order of a batch split 8 ways (CPUs differ: CI's once moved 2 of 7680
  # values by 1.2e-4 over 20 iterations), far inside eps = 2/255; another
  # adversarial point would be up to 2 eps away.
  np.testing.assert_allclose(eight.pop("adv_images"),
                             one.pop("adv_images"),
                             atol=0.1 * 2 / 255)
  _assert_close(eight, one)


def test_autoattack_on_two_hosts_matches_one_process(autoattack_runs):
  # Host 0 attacks rows 0, 2, 4, ..., host 1 the others; only the robust
  # flags (40 bytes: clean, zero gradient, after each of 4 attacks) and the
  # four perturbation numbers cross hosts, never the images (unasked).
  single, multi = autoattack_runs["four"], autoattack_runs["two_hosts"]
  np.testing.assert_array_equal(multi["robust"], single["robust"])
  held = multi.pop("held")
  assert held.sum() == 20 and held[::2].all()
  np.testing.assert_allclose(multi.pop("adv_images")[held],
                             single.pop("adv_images")[held],
                             atol=1e-6)
  assert single.pop("sent_bytes") == 0
  sent = int(multi.pop("sent_bytes"))
  assert sent == 6 * 40 + 4 * 8 < int(multi["image_bytes"]) / 100, sent
  single.pop("held")
  _assert_close(multi, single)


def test_remat_and_bfloat16_keep_parameters_and_gradients():
  import jax
  import jax.numpy as jnp
  from vitat_jax import models
  from tests import _tiny
  kwargs = dict(_tiny.MODEL, depth=2)
  plain = models.create("deit_tiny_patch16_224", **kwargs)
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
  params = plain.init(jax.random.key(1), x)["params"]

  def input_grad(model):
    return jax.jit(jax.grad(lambda v: model.apply({
        "params": params
    }, v).sum()))(x)

  remat = models.create("deit_tiny_patch16_224", remat=True, **kwargs)
  assert jax.tree.structure(remat.init(jax.random.key(1), x)["params"]) == \
      jax.tree.structure(params)
  np.testing.assert_allclose(input_grad(remat),
                             input_grad(plain),
                             rtol=1e-5,
                             atol=1e-6)
  half = models.create("deit_tiny_patch16_224", dtype=jnp.bfloat16, **kwargs)
  half_params = half.init(jax.random.key(1), x)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(half_params))
  logits = half.apply({"params": params}, x)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits,
                             plain.apply({"params": params}, x),
                             atol=0.1)


def test_mesh_size_is_checked():
  import jax
  from vitat_jax import parallel
  from vitat_jax.errors import UserError
  present = jax.device_count()
  assert parallel.make_mesh().devices.size == present
  assert parallel.make_mesh(present).devices.size == present
  with pytest.raises(UserError, match=f"more than the {present} devices"):
    parallel.make_mesh(present + 1)
  with pytest.raises(UserError, match="positive integer"):
    parallel.make_mesh(-1)


def test_incomplete_multihost_settings_fail_in_one_line(monkeypatch):
  from vitat_jax import parallel
  from vitat_jax.errors import UserError
  for variable in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                   "JAX_PROCESS_ID"):
    monkeypatch.delenv(variable, raising=False)
  assert not parallel.initialize_distributed()  # one process: nothing to do
  with pytest.raises(UserError, match="process's id") as info:
    parallel.initialize_distributed("127.0.0.1:1234", num_processes=2)
  assert "\n" not in str(info.value)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(UserError, match="must be an integer"):
    parallel.initialize_distributed()


def test_cpu_threads_are_set_for_more_devices_than_half_the_cores():
  # The rendezvous deadlock of 8 CPU devices on 2 cores (docs/parallel.md).
  from vitat_jax import parallel
  eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert parallel.cpu_thread_setting(eight, cores=2) == 16
  assert parallel.cpu_thread_setting(eight, cores=15) == 16
  assert parallel.cpu_thread_setting(eight, cores=16) is None
  two = {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=2"}
  assert parallel.cpu_thread_setting(two, cores=2) == 4
  assert parallel.cpu_thread_setting({}, cores=1) is None  # one device
  assert parallel.cpu_thread_setting({"JAX_NUM_CPU_DEVICES": "4"}, 2) == 8
  assert parallel.cpu_thread_setting(dict(eight, JAX_NUM_CPU_DEVICES="1"),
                                     2) is None
  # The user's choice and a run without the CPU platform are left alone.
  for extra in ({"PJRT_NPROC": "8"}, {"NPROC": "3"}, {"JAX_PLATFORMS": "cuda"}):
    assert parallel.cpu_thread_setting(dict(eight, **extra), 2) is None
  assert parallel.cpu_thread_setting(dict(eight, JAX_PLATFORMS="cuda,cpu"),
                                     2) == 16
  environ = dict(eight)
  threads = parallel.configure_cpu_threads(environ)
  assert environ.get("PJRT_NPROC") == (str(threads) if threads else None)


def _parser():
  parser = argparse.ArgumentParser()
  for flag, kind in (("devices", int), ("num_processes", int),
                     ("process_id", int), ("coordinator",
                                           str), ("workdir", str), ("out", str),
                     ("eval_attacks", str), ("task", str), ("fsdp", str)):
    parser.add_argument(f"--{flag}", type=kind, required=True)
  parser.add_argument("--sigterm_process", type=int, default=-1)
  return parser


if __name__ == "__main__":
  if sys.argv[1:2] == ["--children"]:
    _fork_children(sys.argv[2])
  else:  # one child by itself, e.g. to debug it
    parsed = _parser().parse_args()
    {"train": _child, "autoattack": _autoattack_child}[parsed.task](parsed)
