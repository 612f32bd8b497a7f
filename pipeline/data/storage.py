"""URL-addressed storage: local paths and ``s3://bucket/key`` behind one small set of functions.

Used by the data stage (shards, manifests) and by training/evaluation (run directories).

S3 goes through boto3 with the standard AWS credential chain (environment, shared config files,
instance/role credentials). The endpoint comes from :class:`S3Settings` (``endpoint_url``) or the
``AWS_ENDPOINT_URL`` environment variable, so any S3-compatible store works. Every client has
connect/read timeouts and botocore's own retry policy (``standard`` or ``adaptive`` mode with a
bounded number of attempts); nothing here loops on failures by hand. Clients are cached per
process id, so a client made before a ``fork`` (DataLoader workers, Ray workers) is never reused
in the child, where its connection pool would corrupt streams.

Errors say what went wrong and where, and never contain credentials:
:class:`BucketNotFound`, :class:`AccessDenied`, :class:`EndpointUnreachable` (all
:class:`StorageError`), ``FileNotFoundError`` for a missing object.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()

__all__ = [
    "AccessDenied",
    "BucketNotFound",
    "EndpointUnreachable",
    "S3Settings",
    "StorageError",
    "check_bucket",
    "delete_prefix",
    "download_file",
    "list_subdirs",
    "move_file",
    "sha256",
    "sha256_file",
    "exists",
    "get_client",
    "is_s3",
    "join",
    "list_dir",
    "list_prefix",
    "list_urls",
    "open_stream",
    "read_bytes",
    "settings_from_config",
    "size",
    "split_s3",
    "upload_file",
    "write_bytes",
]

_MiB = 1 << 20


class StorageError(OSError):
    """A storage operation failed; the message names the URL and the cause (never a secret)."""


class BucketNotFound(StorageError):
    """The bucket of an ``s3://`` URL does not exist at the endpoint."""


class AccessDenied(StorageError):
    """The store refused the request: wrong secret, unknown access key, or no permission."""


class EndpointUnreachable(StorageError):
    """No connection to the S3 endpoint could be made (after botocore's retries)."""


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """How to talk to S3. ``None`` fields fall back to the environment / boto3 defaults."""

    endpoint_url: str | None = None
    region: str | None = None
    retry_mode: Literal["standard", "adaptive"] = "standard"
    max_attempts: int = 5
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    multipart_threshold: int = 64 * _MiB
    multipart_chunksize: int = 16 * _MiB
    max_pool_connections: int = 16

    def __post_init__(self) -> None:
        if self.retry_mode not in ("standard", "adaptive"):
            raise ValueError(f"retry_mode: {self.retry_mode!r} is not allowed; use 'standard' or 'adaptive'")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: {self.max_attempts!r} is not allowed; it must be >= 1")
        for name in ("connect_timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not allowed; it must be > 0")
        if self.multipart_chunksize < 5 * _MiB:
            raise ValueError(
                f"multipart_chunksize: {self.multipart_chunksize!r} is not allowed; S3 parts are >= 5 MiB"
            )

    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None

    def with_endpoint(self, endpoint_url: str | None) -> S3Settings:
        return self if endpoint_url is None else dataclasses.replace(self, endpoint_url=endpoint_url)


DEFAULT_SETTINGS = S3Settings()


def settings_from_config(data) -> S3Settings:
    """:class:`S3Settings` from a ``pipeline.config.DataConfig`` (its ``s3_*`` fields)."""
    return S3Settings(
        endpoint_url=data.s3_endpoint_url,
        retry_mode=data.s3_retry_mode,
        max_attempts=data.s3_max_attempts,
        connect_timeout_s=data.s3_connect_timeout_s,
        read_timeout_s=data.s3_read_timeout_s,
    )


# ---------------------------------------------------------------------------------------------
# URLs


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(url):
        raise ValueError(f"url: {url!r} is not allowed here; expected s3://bucket/key")
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"url: {url!r} has no bucket; expected s3://bucket/key")
    return bucket, key


def _check_url(url: str) -> str:
    url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise ValueError(f"url: {url!r} is not allowed; give a local path or s3://bucket/key")
    if "://" in url and not is_s3(url) and not url.startswith("file://"):
        raise ValueError(f"url: {url!r} is not allowed; only local paths, file:// and s3:// are supported")
    return url[len("file://") :] if url.startswith("file://") else url


def join(url: str, *parts: str) -> str:
    """Join path parts with ``/`` (S3 keys and POSIX paths alike)."""
    out = str(url)
    for part in parts:
        part = str(part)
        if not part:
            continue
        out = part if not out else out.rstrip("/") + "/" + part.lstrip("/")
    return out


# ---------------------------------------------------------------------------------------------
# Clients: one per (process, settings, credential environment)

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _credential_fingerprint() -> str:
    # A digest, so that rotating credentials in the environment gives a new client; the
    # secret itself is never stored in the key or printed.
    h = hashlib.sha256()
    for name in _CREDENTIAL_ENV:
        h.update(name.encode() + b"=" + os.environ.get(name, "").encode() + b"\0")
    return h.hexdigest()


def get_client(settings: S3Settings | None = None):
    """The boto3 S3 client of this process for ``settings`` (created on first use)."""
    settings = settings or DEFAULT_SETTINGS
    endpoint = settings.resolved_endpoint()
    key = (os.getpid(), settings, endpoint, _credential_fingerprint())
    client = _clients.get(key)
    if client is not None:
        return client
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": settings.retry_mode, "max_attempts": settings.max_attempts},
                connect_timeout=settings.connect_timeout_s,
                read_timeout=settings.read_timeout_s,
                max_pool_connections=settings.max_pool_connections,
                # S3-compatible stores on an explicit endpoint expect path-style addressing.
                s3={"addressing_style": "path" if endpoint else "auto"},
            )
            session = boto3.session.Session()
            region = settings.region or session.region_name or ("us-east-1" if endpoint else None)
            client = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
            # Drop clients of other processes (inherited through fork); never use them here.
            for stale in [k for k in _clients if k[0] != os.getpid()]:
                del _clients[stale]
            _clients[key] = client
    return client


def _translate(exc: Exception, url: str, settings: S3Settings | None) -> Exception:
    """A botocore exception as a clear storage error (no credentials in the message)."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    endpoint = (settings or DEFAULT_SETTINGS).resolved_endpoint() or "the AWS default endpoint"
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return EndpointUnreachable(f"{url}: cannot reach S3 endpoint {endpoint} ({type(exc).__name__})")
    if isinstance(exc, ReadTimeoutError):
        return StorageError(f"{url}: S3 endpoint {endpoint} did not answer in time (read timeout)")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return AccessDenied(
            f"{url}: no usable AWS credentials found (checked the standard chain: AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws, instance/role credentials)"
        )
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        bucket = split_s3(url)[0] if is_s3(url) else "?"
        if code == "NoSuchBucket":
            return BucketNotFound(f"{url}: bucket '{bucket}' does not exist at {endpoint}; create it first")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return FileNotFoundError(f"{url}: no such object")
        if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403", "Forbidden") or status == 403:
            return AccessDenied(
                f"{url}: S3 at {endpoint} refused the request ({code or status}); check the access key "
                "and secret (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or your profile) and the bucket policy"
            )
        return StorageError(f"{url}: S3 error {code or status}: {err.get('Message', '')}")
    return exc


class _S3Call:
    """Context manager that turns botocore errors into :class:`StorageError` for ``url``."""

    def __init__(self, url: str, settings: S3Settings | None):
        self.url, self.settings = url, settings

    def __enter__(self) -> _S3Call:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            return False
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, (BotoCoreError, ClientError)):
            raise _translate(exc, self.url, self.settings) from None
        return False


def check_bucket(url: str, settings: S3Settings | None = None) -> None:
    """Fail fast with :class:`BucketNotFound` / :class:`AccessDenied` / :class:`EndpointUnreachable`."""
    bucket, _ = split_s3(url)
    client = get_client(settings)
    with _S3Call(url, settings):
        try:
            client.head_bucket(Bucket=bucket)
        except Exception as exc:
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError):
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in ("404", "NoSuchBucket", "NotFound"):
                    raise BucketNotFound(
                        f"{url}: bucket '{bucket}' does not exist at "
                        f"{(settings or DEFAULT_SETTINGS).resolved_endpoint() or 'the AWS default endpoint'}; "
                        "create it first"
                    ) from None
            raise


# ---------------------------------------------------------------------------------------------
# Operations


def read_bytes(url: str, settings: S3Settings | None = None) -> bytes:
    url = _check_url(url)
    if not is_s3(url):
        return Path(url).read_bytes()
    bucket, key = split_s3(url)
    with _S3Call(url, settings):
        return get_client(settings).get_object(Bucket=bucket, Key=key)["Body"].read()


def _atomic_local_write(path: Path, write: Any) -> None:
    """Write a local file through a temporary sibling and a rename: readers never see it half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(url: str, data: bytes, settings: S3Settings | None = None) -> None:
    """Write ``data`` at ``url``; atomic for local paths (temp file + rename), and S3 PUTs are atomic."""
    url = _check_url(url)
    if not is_s3(url):
        def write(f: IO[bytes]) -> None:
            f.write(data)

        _atomic_local_write(Path(url), write)
        return
    bucket, key = split_s3(url)
    with _S3Call(url, settings):
        get_client(settings).put_object(Bucket=bucket, Key=key, Body=bytes(data))


def _transfer_config(settings: S3Settings | None):
    from boto3.s3.transfer import TransferConfig

    s = settings or DEFAULT_SETTINGS
    return TransferConfig(multipart_threshold=s.multipart_threshold, multipart_chunksize=s.multipart_chunksize)


def upload_file(path: str | os.PathLike, url: str, settings: S3Settings | None = None) -> None:
    """Copy a local file to ``url`` (multipart upload above ``multipart_threshold`` on S3)."""
    url = _check_url(url)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"upload_file: local file {path!r} does not exist")
    if not is_s3(url):
        def copy(f: IO[bytes]) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f)

        _atomic_local_write(Path(url), copy)
        return
    bucket, key = split_s3(url)
    from boto3.exceptions import S3UploadFailedError

    with _S3Call(url, settings):
        try:
            get_client(settings).upload_file(path, bucket, key, Config=_transfer_config(settings))
        except S3UploadFailedError as exc:
            text = str(exc)
            if "NoSuchBucket" in text:
                raise BucketNotFound(f"{url}: bucket '{bucket}' does not exist; create it first") from None
            if any(code in text for code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied")):
                raise AccessDenied(f"{url}: S3 refused the upload; check the access key and secret") from None
            raise StorageError(f"{url}: upload failed: {text}") from None


def download_file(url: str, path: str | os.PathLike, settings: S3Settings | None = None) -> None:
    """Copy ``url`` to a local file (written to a temp name, then renamed)."""
    url = _check_url(url)
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if is_s3(url):
            bucket, key = split_s3(url)
            with _S3Call(url, settings):
                get_client(settings).download_file(bucket, key, tmp, Config=_transfer_config(settings))
        else:
            shutil.copyfile(url, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _S3Stream:
    """A read-only binary stream over an S3 object body; errors become :class:`StorageError`."""

    def __init__(self, body, url: str, settings: S3Settings | None):
        self._body, self._url, self._settings = body, url, settings
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        try:
            return self._body.read(None if n is None or n < 0 else n)
        except (BotoCoreError, HTTPError, OSError) as exc:
            raise StorageError(f"{self._url}: stream interrupted ({type(exc).__name__}: {exc})") from None

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._body.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<S3 stream {self._url}>"


def open_stream(url: str, settings: S3Settings | None = None) -> IO[bytes]:
    """A streaming binary reader over ``url``; S3 objects are streamed, never written to disk."""
    url = _check_url(url)
    if not is_s3(url):
        return open(url, "rb")
    bucket, key = split_s3(url)
    with _S3Call(url, settings):
        body = get_client(settings).get_object(Bucket=bucket, Key=key)["Body"]
    return _S3Stream(body, url, settings)  # type: ignore[return-value]


def size(url: str, settings: S3Settings | None = None) -> int:
    url = _check_url(url)
    if not is_s3(url):
        return os.path.getsize(url)
    bucket, key = split_s3(url)
    with _S3Call(url, settings):
        return int(get_client(settings).head_object(Bucket=bucket, Key=key)["ContentLength"])


def _iter_s3(url: str, settings: S3Settings | None, delimiter: str | None) -> Iterator[dict]:
    bucket, key = split_s3(url)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key}
    if delimiter:
        kwargs["Delimiter"] = delimiter
    with _S3Call(url, settings):
        for page in get_client(settings).get_paginator("list_objects_v2").paginate(**kwargs):
            yield page


def list_prefix(url: str, settings: S3Settings | None = None) -> list[str]:
    """Full URLs of the file/object ``url`` or of everything in the folder ``url`` (recursive, sorted).

    Folder semantics on S3 too: ``s3://b/run/1`` lists ``run/1`` and ``run/1/...``, never ``run/10``.
    """
    url = _check_url(url)
    if not is_s3(url):
        root = Path(url)
        if root.is_file():
            return [str(root)]
        if not root.is_dir():
            return []
        return sorted(str(p) for p in root.rglob("*") if p.is_file())
    bucket, key = split_s3(url)
    out = []
    for page in _iter_s3(url, settings, None):
        for obj in page.get("Contents", []):
            k = obj["Key"]
            if not key or key.endswith("/") or k == key or k.startswith(key + "/"):
                out.append(f"s3://{bucket}/{k}")
    return sorted(out)


list_urls = list_prefix


def list_dir(url: str, settings: S3Settings | None = None) -> list[str]:
    """Names of the immediate children (files and folders) of the folder ``url`` (sorted)."""
    url = _check_url(url)
    if not is_s3(url):
        root = Path(url)
        return sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    prefix = url.rstrip("/") + "/"
    bucket, key = split_s3(prefix)
    names = set()
    for page in _iter_s3(prefix, settings, "/"):
        names.update(obj["Key"][len(key) :] for obj in page.get("Contents", []))
        names.update(p["Prefix"][len(key) :].rstrip("/") for p in page.get("CommonPrefixes", []))
    names.discard("")
    return sorted(names)


def exists(url: str, settings: S3Settings | None = None) -> bool:
    """Whether a file/object, or a non-empty folder/prefix, exists at ``url``."""
    url = _check_url(url)
    if not is_s3(url):
        return os.path.exists(url)
    bucket, key = split_s3(url)
    client = get_client(settings)
    if key and not key.endswith("/"):
        try:
            with _S3Call(url, settings):
                client.head_object(Bucket=bucket, Key=key)
            return True
        except FileNotFoundError:
            # HEAD has no error body, so a missing bucket also reads as 404: the listing
            # below tells them apart (it raises BucketNotFound).
            pass
    prefix = key.rstrip("/") + "/" if key else ""
    with _S3Call(url, settings):
        resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    return bool(resp.get("KeyCount", 0))


def list_subdirs(url: str, settings: S3Settings | None = None) -> list[str]:
    """Names of the immediate sub-folders (S3: common prefixes) of the folder ``url`` (sorted)."""
    url = _check_url(url)
    if not is_s3(url):
        root = Path(url)
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    prefix = url.rstrip("/") + "/"
    _, key = split_s3(prefix)
    names = {p["Prefix"][len(key):].rstrip("/") for page in _iter_s3(prefix, settings, "/")
             for p in page.get("CommonPrefixes", [])}
    names.discard("")
    return sorted(names)


def move_file(path: str | os.PathLike, url: str, settings: S3Settings | None = None) -> None:
    """Move a local file to ``url``: a rename on the local filesystem, an upload then unlink for S3."""
    url = _check_url(url)
    if not is_s3(url):
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, url)
        return
    upload_file(path, url, settings)
    os.unlink(path)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256(url: str, settings: S3Settings | None = None) -> str:
    """Hex sha256 of the file/object at ``url``, streamed."""
    url = _check_url(url)
    if not is_s3(url):
        return sha256_file(url)
    h = hashlib.sha256()
    with open_stream(url, settings) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def delete_prefix(url: str, settings: S3Settings | None = None) -> int:
    """Delete the file/object ``url`` or the folder ``url`` with everything in it; returns how many went."""
    url = _check_url(url)
    if not is_s3(url):
        path = Path(url)
        if path.is_dir():
            count = sum(1 for p in path.rglob("*") if p.is_file())
            shutil.rmtree(path)
            return count
        if path.exists():
            path.unlink()
            return 1
        return 0
    bucket, _ = split_s3(url)
    keys = [u[len(f"s3://{bucket}/") :] for u in list_prefix(url, settings)]
    client = get_client(settings)
    for i in range(0, len(keys), 1000):
        batch = keys[i : i + 1000]
        with _S3Call(url, settings):
            resp = client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        if resp.get("Errors"):
            first = resp["Errors"][0]
            raise StorageError(f"{url}: could not delete {first.get('Key')}: {first.get('Code')} {first.get('Message')}")
    return len(keys)
