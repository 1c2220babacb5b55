"""Images/s and peak memory of the training input path on an image folder.

Reads root/train through exactly what training uses (`data.load` with the
folder read file by file, then `pipeline.train_batches`: grain workers
decode, transform and batch; no model) and prints the rate and the peak
resident memory of the loader (this process and each worker):

    python -m benchmarks.make_imagenet_like --out=/tmp/inlike_2k --train=2000
    python -m benchmarks.input_pipeline --root=/tmp/inlike_2k \
        --image_size=224 --workers=1 --batches=40

The last line is `images/s: X`. The first `--warmup` batches (worker start
and the first reads) are not timed. --transform picks data.train_transform
(squash, random_resized_crop). --compare_decoders=N instead times, in this
process on N files, the JPEG decoders considered for the workers.

Run from the repository root, as a module (`python -m benchmarks.input_pipeline`):
the checkout's `vitat_jax` then import without a path set up here.
"""

import argparse
import multiprocessing
import os
import pathlib
import resource
import time

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _hwm_mb(pid) -> float:
  """Peak resident set (VmHWM) of a live process, in MB."""
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _cpu_s(pid) -> float:
  """User + system CPU seconds of a live process."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(root: str,
        image_size: int,
        workers: int,
        batches: int,
        batch_size: int,
        transform: str,
        warmup: int,
        seed: int = 0):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vitat_jax import data  # pylint: disable=g-import-not-at-top
  from vitat_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(
      dict(name="image_folder",
           root=root,
           image_size=image_size,
           train_transform=transform,
           decoded_cache_mb=0,
           cache_dir=os.path.join(root, ".vitat_cache")))
  start = time.perf_counter()
  splits = data.load(config)
  load_s = time.perf_counter() - start
  assert isinstance(splits.train, data.FileSource), type(splits.train)
  iterator = pipeline.train_batches(splits.train,
                                    batch_size,
                                    seed=seed,
                                    workers=workers)
  for _ in range(warmup):
    next(iterator)
  children = multiprocessing.active_children()
  worker_cpu_start = sum(_cpu_s(p.pid) for p in children)
  start = time.perf_counter()
  cpu_start = os.times()
  for _ in range(batches):
    images, labels = next(iterator)
    assert images.shape == (batch_size, image_size, image_size, 3)
    assert labels.shape == (batch_size,)
  seconds = time.perf_counter() - start
  cpu_end = os.times()
  worker_cpu = sum(_cpu_s(p.pid) for p in children) - worker_cpu_start
  worker_mb = [_hwm_mb(p.pid) for p in multiprocessing.active_children()]
  main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  iterator.close()
  return dict(images=len(splits.train),
              load_s=load_s,
              seconds=seconds,
              rate=batches * batch_size / seconds,
              main_mb=main_mb,
              worker_mb=worker_mb,
              main_cpu_s=(cpu_end.user + cpu_end.system) -
              (cpu_start.user + cpu_start.system),
              worker_cpu_s=worker_cpu,
              load_avg=os.getloadavg())


def compare_decoders(root: str, image_size: int, count: int, rounds: int = 3):
  """Prints images/s of decode + squash to image_size, one core, per option
  (interleaved rounds, best of each, to damp a shared CPU's noise)."""
  import io  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vitat_jax.data import decode  # pylint: disable=g-import-not-at-top
  files = sorted(pathlib.Path(root, "train").glob("*/*.JPEG"))[:count]
  blobs = [f.read_bytes() for f in files]
  size = (image_size, image_size)

  def pil_full(blob):
    image = Image.open(io.BytesIO(blob)).convert("RGB")
    return np.asarray(image.resize(size, Image.BILINEAR))

  def pil_draft_half(blob):  # DCT 1/2 even when it upsamples: not exact
    image = Image.open(io.BytesIO(blob))
    image.draft("RGB", (image.size[0] // 2, image.size[1] // 2))
    return np.asarray(image.convert("RGB").resize(size, Image.BILINEAR))

  options = {
      "vitat_jax decode.Transform (PIL, draft when exact)":
          lambda blob: decode.Transform("squash", image_size)(blob),
      "PIL full decode + resize":
          pil_full,
      "PIL draft 1/2 always + resize":
          pil_draft_half
  }
  try:
    import simplejpeg  # pylint: disable=g-import-not-at-top
    options["simplejpeg + PIL resize"] = lambda blob: np.asarray(
        Image.fromarray(simplejpeg.decode_jpeg(blob, "RGB")).resize(
            size, Image.BILINEAR))
  except ImportError:
    pass
  best = {name: float("inf") for name in options}
  best_cpu = dict(best)
  reference = [pil_full(b) for b in blobs[:20]]
  for _ in range(rounds):
    for name, fn in options.items():
      start, cpu_start = time.perf_counter(), time.process_time()
      for blob in blobs:
        fn(blob)
      best[name] = min(best[name], time.perf_counter() - start)
      best_cpu[name] = min(best_cpu[name], time.process_time() - cpu_start)
  for name, fn in options.items():
    error = np.mean([
        np.abs(fn(b).astype(int) - r).mean() for b, r in zip(blobs, reference)
    ])
    print(f"{name}: {len(blobs) / best[name]:.0f} images/s wall, "
          f"{len(blobs) / best_cpu[name]:.0f} per CPU-second; mean |diff| to "
          f"the full decode {error:.2f}/255")
  print(f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--workers", type=int, default=1)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--transform",
                      default="squash",
                      choices=("squash", "random_resized_crop"))
  parser.add_argument("--compare_decoders", type=int, default=0)
  args = parser.parse_args(argv)
  if args.compare_decoders:
    compare_decoders(args.root, args.image_size, args.compare_decoders)
    return
  result = run(args.root, args.image_size, args.workers, args.batches,
               args.batch_size, args.transform, args.warmup)
  workers_mb = result["worker_mb"]
  print(
      f"root {args.root}: {result['images']} images, indexed in "
      f"{result['load_s']:.1f} s; transform {args.transform}, {args.workers} worker(s), {args.batches} batches of "
      f"{args.batch_size} at {args.image_size}px")
  print(f"loader peak RSS: main {result['main_mb']:.0f} MB, workers "
        f"{' + '.join(f'{m:.0f}' for m in workers_mb) or '-'} MB, total "
        f"{result['main_mb'] + sum(workers_mb):.0f} MB")
  print(
      f"load average during the run: "
      f"{', '.join(f'{x:.2f}' for x in result['load_avg'])} "
      f"(on {os.cpu_count()} CPUs); main process CPU "
      f"{result['main_cpu_s']:.1f} s, workers {result['worker_cpu_s']:.1f} s of "
      f"{result['seconds']:.1f} s wall")
  if result["worker_cpu_s"]:
    print(f"images per worker CPU-second: "
          f"{args.batches * args.batch_size / result['worker_cpu_s']:.0f}")
  print(f"images/s: {result['rate']:.1f}")


if __name__ == "__main__":
  main()
