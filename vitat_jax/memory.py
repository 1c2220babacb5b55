"""Whether the training step fits the device, decided before its first run.

    step = memory.compile_and_check(jitted_step, args, config)

The step is compiled ahead of time on the first batch; XLA's
`memory_analysis()` of the compiled program gives what one device holds
while it runs (arguments and outputs, less the donated state, plus
temporaries). Against the device's memory (`device_memory_gb`, else what
the backend reports: GPUs and TPUs do, the CPU does not, so there is no
check there unless asked), a step that cannot fit is a one-line error that
names the `accum_steps` (and `model.remat`) that would, instead of an
out-of-memory crash somewhere in the first step.
"""

import math
from typing import Any, Optional, Sequence

import jax
from absl import logging

from vitat_jax.errors import UserError

GB = 2**30
# What is kept free of the limit for the runtime, the input pipeline's
# device buffers and fragmentation.
HEADROOM = 0.9


def device_limit(config, device=None) -> Optional[int]:
  """Bytes one device may hold: `device_memory_gb`, else the backend's
  `bytes_limit`, else None (unknown: no check)."""
  if config.device_memory_gb:
    return int(config.device_memory_gb * GB)
  stats = (device or jax.local_devices()[0]).memory_stats() or {}
  return stats.get("bytes_limit")


def step_bytes(compiled) -> Optional[dict]:
  """{"fixed": arguments + outputs - aliased (donated) + code, "temp":
  temporaries} of a compiled program, per device; None where the backend
  gives no analysis."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if stats is None:
    return None
  fixed = (stats.argument_size_in_bytes + stats.output_size_in_bytes -
           stats.alias_size_in_bytes + stats.generated_code_size_in_bytes)
  return {"fixed": int(fixed), "temp": int(stats.temp_size_in_bytes)}


def advice(config, needed: dict, limit: int) -> str:
  """The accum_steps (a divisor of batch_size) whose micro-batches' temporaries
  would fit, by the estimate that they scale with the micro-batch, and
  remat where the model has it off."""
  usable = HEADROOM * limit - needed["fixed"]
  hints = []
  if usable <= 0 and not config.fsdp:
    hints.append("--config.fsdp=True (the state alone does not fit)")
  if usable > 0:
    accum = config.accum_steps
    factor = math.ceil(needed["temp"] / usable)
    fits = [
        k for k in range(accum * max(factor, 2), config.batch_size + 1)
        if config.batch_size % k == 0
    ]
    if fits:
      hints.append(f"--config.accum_steps={fits[0]} (an estimate: "
                   "temporaries scale with the micro-batch)")
  if not config.model.get("remat"):
    hints.append("--config.model.remat=True")
  hints.append("a smaller --config.batch_size")
  return ", or ".join(hints)


def compile_and_check(jitted, args: Sequence[Any], config):
  """`jitted` compiled for `args` (arguments of another shape or dtype go
  to `jitted`, which compiles for them), or a one-line UserError when the
  step needs more memory than a device has (nothing has run yet)."""
  compiled = jitted.lower(*args).compile()

  def step(*call_args):
    try:
      return compiled(*call_args)
    except TypeError:  # another signature than the first batch's
      return jitted(*call_args)

  needed = step_bytes(compiled)
  limit = device_limit(config)
  if needed is None:
    return step
  total = needed["fixed"] + needed["temp"]
  logging.info("the training step holds %.3g GB per device%s", total / GB,
               "" if limit is None else f" of {limit / GB:.3g} GB")
  if limit is not None and total > HEADROOM * limit:
    raise UserError(
        f"the training step needs {total / GB:.3g} GB per device "
        f"({needed['temp'] / GB:.3g} GB of it temporaries) and a device has "
        f"{limit / GB:.3g} GB (device_memory_gb, else the backend's limit; "
        f"{HEADROOM:.0%} usable): set {advice(config, needed, limit)}")
  return step
