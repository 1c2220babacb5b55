"""Progress bar: silent off a terminal, images/s and ETA on one."""

import io

from vitat_jax import progress


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def _run(stream, **kwargs):
  bar = progress.Progress(total_steps=25,
                          steps_per_epoch=10,
                          batch_size=64,
                          stream=stream,
                          **kwargs)
  for step in range(kwargs.get("start_step", 0) + 1, 26):
    bar.update(step)
    if step == 12:
      bar.set_metrics({"loss": 1.25, "adv-acc": 0.4})
      with bar.hidden():
        stream.write("a log line\n")
  bar.close()
  return stream.getvalue()


def test_silent_when_not_a_terminal():
  stream = io.StringIO()  # like CI logs or `| tee`
  bar = progress.Progress(25, 10, 64, stream=stream)
  assert not bar.enabled
  assert _run(stream) == "a log line\n"


def test_draws_one_bar_per_epoch_on_a_terminal():
  stream = _Terminal()
  output = _run(stream)
  assert "epoch 1/3" in output and "epoch 3/3" in output
  assert "img/s" in output and "run ETA" in output
  assert "loss 1.25" in output and "a log line" in output
  final_lines = [l.rsplit("\r", 1)[-1] for l in output.splitlines()]
  assert any(
      l.startswith("epoch 3/3: 100%") and "320/320" in l for l in final_lines)


def test_forced_on_and_resumed_mid_epoch():
  output = _run(io.StringIO(), enabled=True, start_step=13)
  assert "epoch 1/3" not in output
  assert "192/640" in output  # epoch 2 resumes with 3 of 10 steps done


def test_forced_off_on_a_terminal():
  assert _run(_Terminal(), enabled=False) == "a log line\n"
