"""Runs a list of configs one after another, each in its own workdir.

    python scripts/sweep.py --study=ard_prm --base_workdir=runs/studies \
        --extra=pretrained_dir=pretrained --dry_run
    python scripts/sweep.py --base_workdir=runs/table \
        --configs="configs/cifar10.py:method=at" "configs/cifar10.py:method=trades"

Workdirs are siblings under --base_workdir, named after the config string.
The sweep is resumable: rerunning it reruns each command, and a finished
run's command returns at once, an interrupted one resumes from its last
checkpoint. --dry_run prints the commands instead of running them; flags
after `--` go to every main.py command (e.g. -- --config.optim.lr=0.05).
"""

import argparse
import os
import re
import shlex
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)


def workdir_name(config_string: str) -> str:
  stem, _, arg = config_string.partition(":")
  name = os.path.splitext(os.path.basename(stem))[0]
  if arg:
    name += "_" + re.sub(r"[^A-Za-z0-9.=-]+", "_", arg).replace("=", "-")
  return name.strip("_")


def commands(config_strings, base_workdir, extra_flags=()):
  return [[
      sys.executable,
      os.path.join(_ROOT, "main.py"), f"--config={c}",
      f"--workdir={os.path.join(base_workdir, workdir_name(c))}", *extra_flags
  ] for c in config_strings]


def study_configs(study, extra=""):
  from configs import studies  # pylint: disable=g-import-not-at-top
  if study not in studies.STUDIES:
    raise SystemExit(f"unknown study {study!r}: use one of "
                     f"{', '.join(studies.STUDIES)}")
  suffix = f",{extra}" if extra else ""
  return [f"configs/studies.py:{a}{suffix}" for a in studies.study_args(study)]


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  extra_flags = []
  if "--" in argv:
    extra_flags = argv[argv.index("--") + 1:]
    argv = argv[:argv.index("--")]
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs",
                      nargs="*",
                      default=[],
                      help="config strings, e.g. configs/cifar10.py:method=at")
  parser.add_argument("--study", help="all arms of a configs/studies.py study")
  parser.add_argument("--extra",
                      default="",
                      help="key=value,... appended to every study arm")
  parser.add_argument("--base_workdir", default="runs/sweep")
  parser.add_argument("--dry_run", action="store_true")
  args = parser.parse_args(argv)
  args.base_workdir = os.path.abspath(args.base_workdir)
  config_strings = list(args.configs)
  if args.study:
    config_strings += study_configs(args.study, args.extra)
  if not config_strings:
    parser.error("give --configs and/or --study")
  failed = []
  for command in commands(config_strings, args.base_workdir, extra_flags):
    print(" ".join(shlex.quote(part) for part in command), flush=True)
    if not args.dry_run and subprocess.run(command, cwd=_ROOT).returncode:
      failed.append(command[2])
  if failed:
    print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
