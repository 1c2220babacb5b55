"""A GCS server on 127.0.0.1 for tests: `gcp-storage-emulator`, in memory.

    python tests/_gcs_emulator.py PORT BUCKET

One gap is filled: its media downloads carry no `x-goog-generation` header,
which tensorstore's GCS driver reads back (orbax's OCDBT manifest is read
and rewritten within a save) and otherwise refuses as "Malformed
StorageGeneration". Preconditions (`ifGenerationMatch`) stay unchecked, as
in the emulator: one writer per object, as in these tests.
"""

import sys
import threading

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"],
                               request.params["object_id"])
  except Exception:  # pylint: disable=broad-except
    return  # not found: the emulator answered 404 already
  response["x-goog-generation"] = str(obj.get("generation") or "1")
  response["x-goog-metageneration"] = str(obj.get("metageneration") or "1")


objects.download = _download_with_generation

# Imported after the patch: its routing table binds `objects.download`.
from gcp_storage_emulator import server as server_lib  # noqa: E402  pylint: disable=g-import-not-at-top


def main():
  port, bucket = int(sys.argv[1]), sys.argv[2]
  server = server_lib.create_server("127.0.0.1",
                                    port,
                                    in_memory=True,
                                    default_bucket=bucket)
  server.start()
  threading.Event().wait()


if __name__ == "__main__":
  main()
