"""A local Hugging Face Hub look-alike, for tests and the offline demo.

``huggingface_hub`` talks to any endpoint that answers like the Hub, so pointing ``HfApi(endpoint=...)``,
``hf_hub_download(endpoint=...)`` or ``HF_ENDPOINT`` at this server exercises the real client code paths
(typed errors, resumable downloads, caching, commits, pull requests) without the internet.

This is a development/demo server, not a Hub:

* it binds to 127.0.0.1 by default and has no real authentication: any ``Authorization: Bearer`` token
  is accepted (unless ``tokens=`` restricts them), and a token is required only for writes, private repos
  and ``whoami``. Gated repos refuse every file download (there is no access list);
* it has no git, LFS or Xet protocol: ``preupload`` answers ``uploadMode: "regular"`` so the client sends
  file bytes base64-encoded inside the NDJSON commit. Weight files and files of 10 MiB or more are
  *reported* like LFS files (``lfs.oid`` = sha256, ``ETag``/``X-Linked-Etag`` = sha256), as the Hub does;
* repo ids must have a namespace (``user/name``), as every repo on today's Hub does.

Storage under ``root`` survives restarts: content-addressed blobs (``blobs/ab/<sha256>``), and per repo a
settings file (``repo.json``: ``private``, ``gated``), refs (``refs.json``) and one JSON document per commit
(``commits/<sha>.json``, holding the parents and the full file table). Every write goes to a temporary
file and is renamed into place under a lock, so a reader never sees half a file.

Fault injection for tests (:meth:`HubServer.inject_drop`, :meth:`HubServer.inject_corrupt`) lives in
:mod:`.faults`, in memory only, apart from the normal serving path. The package imports nothing else of hubmerge:
it stands apart, and only the CLI, the demo and the tests use it.
"""

from hubmerge.devhub.server import HubServer, serve

__all__ = ["HubServer", "serve"]
