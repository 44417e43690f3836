"""Pack a root filesystem folder into a single-layer OCI image archive, configured by a Dockerfile.

Used by hack/build-image.sh to build the nhigate and pause images without a Docker daemon. The
image configuration (user, environment, working directory, entry point, command, labels) is read
from the final stage of the Dockerfile, so `docker build -f images/Dockerfile` and the local
build describe the same image from one definition.

The archive is an OCI image layout in a tar (`oci-layout`, `index.json`, `blobs/sha256/...`) plus
a Docker-style `manifest.json`, so `ctr images import`, `docker load` and `skopeo` accept it.

    python3 hack/oci_image.py hash --root DIR PATH...          # content hash of files/trees
    python3 hack/oci_image.py config --dockerfile FILE         # the final stage's config (JSON)
    python3 hack/oci_image.py add-user --rootfs DIR --name N --uid U --gid G --home H
    python3 hack/oci_image.py pack --rootfs DIR --dockerfile FILE --ref REF --out FILE
    python3 hack/oci_image.py inspect FILE                      # verify an archive, print a summary
    python3 hack/oci_image.py apt-mirror --suite bookworm       # the mirror apt uses here

Standard library only: it runs with the machine's python3 before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shlex
import stat
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

# What a Debian-based image has before the Dockerfile's own ENV lines (python:*-slim sets the
# same two); the local rootfs has no base image to inherit them from.
BASE_ENV = (
    ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("LANG", "C.UTF-8"),
)

# Files that never belong in a content hash (build by-products in a working tree).
HASH_SKIP_DIRS = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", "build"})
HASH_SKIP_SUFFIXES = (".pyc", ".pyo", ".egg-info")


# --- Dockerfile -------------------------------------------------------------------------------


@dataclass
class ImageConfig:
    """The runtime configuration the final stage of a Dockerfile gives its image."""

    env: dict[str, str] = field(default_factory=dict)
    user: str = ""
    workdir: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)

    def to_oci(self, base_env: Iterable[tuple[str, str]] = BASE_ENV) -> dict[str, Any]:
        """The `config` object of an OCI image configuration."""
        env = dict(base_env)
        env.update(self.env)
        out: dict[str, Any] = {"Env": [f"{k}={v}" for k, v in env.items()]}
        if self.user:
            out["User"] = self.user
        if self.workdir:
            out["WorkingDir"] = self.workdir
        if self.entrypoint:
            out["Entrypoint"] = list(self.entrypoint)
        if self.cmd:
            out["Cmd"] = list(self.cmd)
        if self.labels:
            out["Labels"] = dict(self.labels)
        return out


def dockerfile_instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, `\\` continuations joined."""
    pending: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        logical = " ".join(p for p in pending if p)
        pending = []
        word, _, rest = logical.partition(" ")
        yield word.upper(), rest.strip()
    if pending:
        logical = " ".join(p for p in pending if p)
        word, _, rest = logical.partition(" ")
        yield word.upper(), rest.strip()


def _key_values(args: str) -> dict[str, str]:
    """`KEY=VALUE KEY2="V 2"` (ENV/LABEL), or the legacy `KEY VALUE` form."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    pairs: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE, got {word!r} in {args!r}")
        pairs[key] = value
    return pairs


def _exec_form(args: str) -> list[str]:
    """ENTRYPOINT/CMD: the JSON (exec) form, or the shell form as Docker wraps it."""
    if args.startswith("["):
        value = json.loads(args)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"exec form must be a JSON list of strings: {args!r}")
        return value
    return ["/bin/sh", "-c", args]


def _resolve(path: str, workdir: str) -> str:
    return os.path.normpath(os.path.join(workdir or "/", path))


def parse_dockerfile(text: str) -> ImageConfig:
    """The image configuration of the Dockerfile's final stage.

    Only what a stage sets itself counts: the base image's own config (e.g. python:slim's PATH)
    is not known here; `BASE_ENV` stands for it. ENTRYPOINT resets CMD, as in Docker.
    """
    config = ImageConfig()
    for word, args in dockerfile_instructions(text):
        if word == "FROM":
            config = ImageConfig()  # a new stage starts from scratch (for what we track)
        elif word == "ENV":
            config.env.update(_key_values(args))
        elif word == "LABEL":
            config.labels.update(_key_values(args))
        elif word == "USER":
            config.user = args
        elif word == "WORKDIR":
            config.workdir = _resolve(args, config.workdir)
        elif word == "ENTRYPOINT":
            config.entrypoint = _exec_form(args)
            config.cmd = []
        elif word == "CMD":
            config.cmd = _exec_form(args)
    return config


# --- rootfs preparation -----------------------------------------------------------------------


def add_user(rootfs: Path, *, name: str, uid: int, gid: int, home: str, login_shell: str) -> None:
    """Give uid/gid a name in the rootfs's /etc/passwd and /etc/group (idempotent).

    Without an entry `getpass.getuser()` (and so kopf's default identity) raises KeyError.
    """
    etc = rootfs / "etc"
    etc.mkdir(parents=True, exist_ok=True)

    def ensure(path: Path, entry: str, id_field: int | None) -> None:
        # An existing line with the same name or the same numeric id must be this very entry.
        new = entry.split(":")
        lines = path.read_text().splitlines() if path.exists() else []
        for line in lines:
            fields = line.split(":")
            same_id = id_field is not None and fields[id_field : id_field + 1] == [new[id_field]]
            if fields[0] == name or same_id:
                if line != entry:
                    raise ValueError(f"{path}: {line!r} conflicts with {entry!r}")
                return
        lines.append(entry)
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o644)

    ensure(etc / "group", f"{name}:x:{gid}:", 2)
    ensure(etc / "passwd", f"{name}:x:{uid}:{gid}::{home}:{login_shell}", 2)  # as useradd writes it
    shadow = etc / "shadow"
    if shadow.exists():  # a locked password, as useradd writes it
        ensure(shadow, f"{name}:!:1::::::", None)
        shadow.chmod(0o640)


# --- packing ----------------------------------------------------------------------------------


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to `target`."""

    def __init__(self, target: IO[bytes] | None) -> None:
        self.target = target
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += len(view)
        if self.target is not None:
            self.target.write(view)
        return len(view)

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


def _walk(top: Path) -> Iterator[Path]:
    """Every path under top, depth first, each folder before its contents, sorted by name."""
    with os.scandir(top) as entries:
        ordered = sorted(entries, key=lambda e: e.name)
    for entry in ordered:
        path = Path(entry.path)
        yield path
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(path)


@dataclass(frozen=True)
class Layer:
    """A packed layer: `digest`/`size` of the compressed blob, `diff_id` of the plain tar."""

    path: Path
    digest: str
    size: int
    diff_id: str


def pack_layer(rootfs: Path, out: Path, *, mtime: int | None = None) -> Layer:
    """Write rootfs as one gzip-compressed layer tar (numeric owners, hard links kept)."""

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uname = info.gname = ""
        if mtime is not None:
            info.mtime = min(int(info.mtime), mtime)
        return info

    with out.open("wb") as raw:
        compressed = _HashingWriter(raw)
        with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=6, mtime=0) as gz:
            plain = _HashingWriter(gz)
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for path in _walk(rootfs):
                    arcname = path.relative_to(rootfs).as_posix()
                    info = tar.gettarinfo(str(path), arcname)
                    if info is None:  # a socket: nothing to carry
                        continue
                    info = normalise(info)
                    if info.isreg():
                        with path.open("rb") as f:
                            tar.addfile(info, f)
                    else:
                        tar.addfile(info)
    return Layer(path=out, digest=compressed.digest, size=compressed.size, diff_id=plain.digest)


def _blob(data: dict[str, Any]) -> tuple[bytes, str]:
    raw = json.dumps(data, indent=None, separators=(",", ":"), sort_keys=True).encode()
    return raw, "sha256:" + hashlib.sha256(raw).hexdigest()


def image_config(
    config: ImageConfig, layer: Layer, *, created: str, arch: str, created_by: str
) -> dict[str, Any]:
    """The OCI image configuration blob for a one-layer image."""
    return {
        "created": created,
        "architecture": arch,
        "os": "linux",
        "config": config.to_oci(),
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        "history": [{"created": created, "created_by": created_by}],
    }


def go_arch(machine: str | None = None) -> str:
    """The OCI/Go architecture name of this machine (`uname -m` spelling in, GOARCH out)."""
    machine = machine or os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )


def write_archive(
    out: Path, *, ref: str, layer: Layer, config_blob: dict[str, Any], arch: str
) -> str:
    """Write the OCI layout tar for one image named `ref`; returns the manifest digest."""
    config_raw, config_digest = _blob(config_blob)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config_raw)},
        "layers": [{"mediaType": MEDIA_LAYER_GZIP, "digest": layer.digest, "size": layer.size}],
        "annotations": {ANNOTATION_REF_NAME: ref_tag(ref)},
    }
    manifest_raw, manifest_digest = _blob(manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest_raw),
                "platform": {"architecture": arch, "os": "linux"},
                "annotations": {ANNOTATION_CONTAINERD_NAME: ref, ANNOTATION_REF_NAME: ref_tag(ref)},
            }
        ],
    }

    def blob_path(digest: str) -> str:
        return "blobs/sha256/" + digest.removeprefix("sha256:")

    docker_manifest = [
        {
            "Config": blob_path(config_digest),
            "RepoTags": [ref],
            "Layers": [blob_path(layer.digest)],
        }
    ]
    tmp = out.with_name(out.name + ".partial")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:

        def add_bytes(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))

        for name in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        add_bytes("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add_bytes(blob_path(config_digest), config_raw)
        add_bytes(blob_path(manifest_digest), manifest_raw)
        info = tar.gettarinfo(str(layer.path), blob_path(layer.digest))
        info.uname = info.gname = ""
        info.uid = info.gid = 0
        info.mode = 0o644
        with layer.path.open("rb") as f:
            tar.addfile(info, f)
        add_bytes("index.json", json.dumps(index, indent=2).encode())
        add_bytes("manifest.json", json.dumps(docker_manifest, indent=2).encode())
    tmp.replace(out)
    return manifest_digest


def ref_tag(ref: str) -> str:
    """The tag of `repo[:port]/name:tag` ("latest" when there is none)."""
    name = ref.rsplit("/", 1)[-1]
    return name.partition(":")[2] or "latest"


def pack(
    rootfs: Path,
    dockerfile: Path,
    ref: str,
    out: Path,
    *,
    created: str = "1970-01-01T00:00:00Z",
    mtime: int | None = None,
    arch: str | None = None,
) -> str:
    """rootfs + the Dockerfile's final-stage config -> OCI archive at `out`."""
    arch = arch or go_arch()
    config = parse_dockerfile(dockerfile.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".layer-") as tmp:
        layer = pack_layer(rootfs, Path(tmp) / "layer.tar.gz", mtime=mtime)
        blob = image_config(
            config,
            layer,
            created=created,
            arch=arch,
            created_by=f"hack/build-image.sh (config from {dockerfile.name})",
        )
        return write_archive(out, ref=ref, layer=layer, config_blob=blob, arch=arch)


# --- reading back -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveSummary:
    """What `inspect` verified in an archive."""

    ref: str
    manifest_digest: str
    config: dict[str, Any]
    layer_digest: str
    layer_size: int
    diff_id: str
    files: int


def inspect_archive(path: Path) -> ArchiveSummary:
    """Check every digest and size from index.json down to the layer; raise ValueError if off."""
    with tarfile.open(path, "r:") as tar:

        def read(name: str) -> bytes:
            member = tar.extractfile(name)
            if member is None:
                raise ValueError(f"{path}: {name} is not a file")
            return member.read()

        def blob(desc: dict[str, Any]) -> bytes:
            algo, _, hexdigest = str(desc["digest"]).partition(":")
            if algo != "sha256":
                raise ValueError(f"unsupported digest {desc['digest']}")
            data = read(f"blobs/sha256/{hexdigest}")
            if hashlib.sha256(data).hexdigest() != hexdigest:
                raise ValueError(f"blob {desc['digest']} does not match its digest")
            if len(data) != desc["size"]:
                raise ValueError(f"blob {desc['digest']}: size {len(data)} != {desc['size']}")
            return data

        layout = json.loads(read("oci-layout"))
        if layout.get("imageLayoutVersion") != "1.0.0":
            raise ValueError(f"unexpected oci-layout {layout}")
        index = json.loads(read("index.json"))
        if index.get("schemaVersion") != 2 or len(index.get("manifests", [])) != 1:
            raise ValueError("index.json must list exactly one manifest")
        desc = index["manifests"][0]
        if desc.get("mediaType") != MEDIA_MANIFEST:
            raise ValueError(f"unexpected manifest media type {desc.get('mediaType')}")
        manifest = json.loads(blob(desc))
        config = json.loads(blob(manifest["config"]))
        (layer_desc,) = manifest["layers"]
        if layer_desc["mediaType"] != MEDIA_LAYER_GZIP:
            raise ValueError(f"unexpected layer media type {layer_desc['mediaType']}")
        layer_raw = blob(layer_desc)
        plain = gzip.decompress(layer_raw)
        diff_id = "sha256:" + hashlib.sha256(plain).hexdigest()
        if config["rootfs"]["diff_ids"] != [diff_id]:
            raise ValueError(f"diff_id {diff_id} != config {config['rootfs']['diff_ids']}")
        with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as layer_tar:
            files = len(layer_tar.getmembers())
        return ArchiveSummary(
            ref=desc["annotations"][ANNOTATION_CONTAINERD_NAME],
            manifest_digest=desc["digest"],
            config=config,
            layer_digest=layer_desc["digest"],
            layer_size=layer_desc["size"],
            diff_id=diff_id,
            files=files,
        )


# --- content hash -----------------------------------------------------------------------------


def _hashed_files(root: Path, rel: str) -> Iterator[Path]:
    top = root / rel
    if top.is_file():
        yield top
        return
    if not top.is_dir():
        raise FileNotFoundError(top)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(
            d for d in dirnames if d not in HASH_SKIP_DIRS and not d.endswith(HASH_SKIP_SUFFIXES)
        )
        for name in sorted(filenames):
            if not name.endswith(HASH_SKIP_SUFFIXES):
                yield Path(dirpath) / name


def content_hash(root: Path, paths: Iterable[str]) -> str:
    """sha256 over the relative names, exec bits and contents of the given files/trees."""
    sha = hashlib.sha256()
    for rel in sorted(paths):
        for path in _hashed_files(root, rel):
            mode = path.stat().st_mode
            sha.update(path.relative_to(root).as_posix().encode() + b"\0")
            sha.update(b"x" if mode & stat.S_IXUSR else b"-")
            sha.update(hashlib.sha256(path.read_bytes()).digest())
    return sha.hexdigest()


# --- apt sources ------------------------------------------------------------------------------


def apt_mirror(suite: str, etc_apt: Path = Path("/etc/apt")) -> str:
    """The first `deb` URI apt is configured with for `suite` (deb822 .sources or .list lines)."""
    files = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.strip().startswith("#") or ":" not in line or line[0].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if (
                    "deb" in fields.get("types", "").split()
                    and suite in fields.get("suites", "").split()
                ):
                    return fields["uris"].split()[0]
        elif path.suffix == ".list":
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if not words or words[0] != "deb":
                    continue
                words = words[1:]
                if words and words[0].startswith("["):  # [arch=... signed-by=...]
                    while words and not words[0].endswith("]"):
                        words = words[1:]
                    words = words[1:]
                if len(words) >= 2 and words[1] == suite:
                    return words[0]
    raise LookupError(f"no apt source for suite {suite!r} under {etc_apt}")


# --- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("hash", help="content hash of files and trees")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("paths", nargs="+")
    p = sub.add_parser("config", help="final-stage image config of a Dockerfile, as OCI JSON")
    p.add_argument("--dockerfile", type=Path, required=True)
    p = sub.add_parser("add-user", help="add a passwd/group entry to a rootfs")
    p.add_argument("--rootfs", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--gid", type=int, required=True)
    p.add_argument("--home", required=True)
    p.add_argument("--shell", default="/usr/sbin/nologin")
    p = sub.add_parser("pack", help="rootfs + Dockerfile config -> OCI archive")
    p.add_argument("--rootfs", type=Path, required=True)
    p.add_argument("--dockerfile", type=Path, required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--created", default="1970-01-01T00:00:00Z")
    p.add_argument("--mtime", type=int, help="clamp file times to this epoch (reproducible)")
    p = sub.add_parser("apt-mirror", help="the Debian mirror apt uses for a suite")
    p.add_argument("--suite", required=True)
    p = sub.add_parser("inspect", help="verify an archive's digests; print a summary")
    p.add_argument("archive", type=Path)
    args = parser.parse_args(argv)

    if args.cmd == "hash":
        print(content_hash(args.root, args.paths))
    elif args.cmd == "config":
        print(json.dumps(parse_dockerfile(args.dockerfile.read_text()).to_oci(), indent=2))
    elif args.cmd == "add-user":
        add_user(
            args.rootfs,
            name=args.name,
            uid=args.uid,
            gid=args.gid,
            home=args.home,
            login_shell=args.shell,
        )
    elif args.cmd == "pack":
        digest = pack(
            args.rootfs, args.dockerfile, args.ref, args.out, created=args.created, mtime=args.mtime
        )
        print(digest)
    elif args.cmd == "apt-mirror":
        print(apt_mirror(args.suite))
    elif args.cmd == "inspect":
        s = inspect_archive(args.archive)
        print(
            json.dumps(
                {
                    "ref": s.ref,
                    "manifest": s.manifest_digest,
                    "layer": s.layer_digest,
                    "layer_size": s.layer_size,
                    "diff_id": s.diff_id,
                    "files": s.files,
                    "config": s.config["config"],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
