"""The image: images/Dockerfile and the daemon-less local build (hack/build-image.sh) agree, and
the OCI archives hack/oci_image.py writes are valid layouts (digests, sizes, diff_id).

Nothing here builds an image: the packing and parsing functions run on a tiny rootfs in tmp_path.
The real build runs in the node end-to-end tests.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from nhigate.controller import manifests as m

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "images" / "Dockerfile"
PAUSE_DOCKERFILE = ROOT / "images" / "pause" / "Dockerfile"
BUILD_SCRIPT = ROOT / "hack" / "build-image.sh"
CHART = ROOT / "charts" / "nhigate"


def _load_oci_image() -> ModuleType:
    spec = importlib.util.spec_from_file_location("oci_image", ROOT / "hack" / "oci_image.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


oci = _load_oci_image()


def final_stage_runs() -> str:
    """The RUN lines of the Dockerfile's final stage, joined."""
    runs: list[str] = []
    for word, args in oci.dockerfile_instructions(DOCKERFILE.read_text()):
        if word == "FROM":
            runs = []
        elif word == "RUN":
            runs.append(args)
    return " ".join(runs)


# --- the one definition -------------------------------------------------------------------------


def test_dockerfile_final_stage_is_the_runtime_contract() -> None:
    config = oci.parse_dockerfile(DOCKERFILE.read_text())
    assert config.user == "65532:65532"
    assert config.workdir == "/tmp"
    assert config.entrypoint == ["nhigate"]
    assert config.cmd == ["--help"]
    assert config.env["HOME"] == "/tmp"  # the only writable place with readOnlyRootFilesystem
    assert config.env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_local_image_config_is_the_dockerfiles() -> None:
    # What the local build writes into the OCI config, field by field, against the Dockerfile.
    config = oci.parse_dockerfile(DOCKERFILE.read_text())
    layer = oci.Layer(path=Path("unused"), digest="sha256:" + "0" * 64, size=1, diff_id="sha256:x")
    blob = oci.image_config(
        config, layer, created="2026-01-01T00:00:00Z", arch="amd64", created_by="t"
    )
    runtime = blob["config"]
    assert runtime["User"] == config.user == "65532:65532"
    assert runtime["Entrypoint"] == config.entrypoint
    assert runtime["Cmd"] == config.cmd
    assert runtime["WorkingDir"] == config.workdir
    assert runtime["Labels"] == config.labels
    env = dict(item.split("=", 1) for item in runtime["Env"])
    assert config.env.items() <= env.items()
    # What python:*-slim provides as its base config, the local base has to carry itself.
    assert env["PATH"].split(":")[:2] == ["/usr/local/sbin", "/usr/local/bin"]
    assert env["LANG"] == "C.UTF-8"
    assert blob["rootfs"] == {"type": "layers", "diff_ids": ["sha256:x"]}


def test_runtime_user_has_a_name_in_both_builds() -> None:
    # getpass.getuser() (kopf's default identity) raises KeyError for a uid without a passwd entry.
    uid, gid = oci.parse_dockerfile(DOCKERFILE.read_text()).user.split(":")
    runs = final_stage_runs()
    assert re.search(rf"groupadd\b[^&]*--gid {gid} nonroot\b", runs), runs
    assert re.search(rf"useradd\b[^&]*--uid {uid} --gid {gid}\b[^&]*\bnonroot\b", runs), runs
    assert "--home-dir /tmp" in runs
    script = BUILD_SCRIPT.read_text()
    assert 'NONROOT_NAME="nonroot"' in script
    assert re.search(rf"add-user [^\n]*--uid {uid} --gid {gid}", script), "builder user differs"
    assert "--home /tmp" in script


def test_chart_and_controller_run_the_images_user() -> None:
    uid = int(oci.parse_dockerfile(DOCKERFILE.read_text()).user.split(":")[0])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == uid
    assert values["podSecurityContext"]["runAsGroup"] == uid
    assert values["securityContext"]["readOnlyRootFilesystem"] is True
    assert uid == m.PROXY_UID


def test_proxy_pods_start_the_images_entry_point() -> None:
    deployment = m.build_proxy_deployment(
        make_minimal_ps(), image="img", policy_version="v1", image_pull_policy="Never"
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == oci.parse_dockerfile(DOCKERFILE.read_text()).entrypoint
    assert container["imagePullPolicy"] == "Never"
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_image_installs_the_projects_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    config = oci.parse_dockerfile(DOCKERFILE.read_text())
    assert config.labels["org.opencontainers.image.version"] == version
    assert f"nhigate=={version}" in final_stage_runs()
    assert (CHART / "Chart.yaml").read_text().count(f'appVersion: "{version}"') == 1


def test_pause_dockerfile_runs_the_compiled_binary() -> None:
    config = oci.parse_dockerfile(PAUSE_DOCKERFILE.read_text())
    assert config.entrypoint == ["/pause"]
    assert config.user == "65535:65535"
    assert '-o "${r}/pause"' in BUILD_SCRIPT.read_text()


def test_chart_names_the_controller_for_kopf() -> None:
    # kopf reads POD_ID (not POD_NAME) for its identity.
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert re.search(
        r"- name: POD_ID\n\s+valueFrom:\n\s+fieldRef:\n\s+fieldPath: metadata.name", deployment
    )
    assert "--proxy-image-pull-policy=" in deployment


def make_minimal_ps() -> Any:
    from nhigate.api.models import ProtectedService

    return ProtectedService.model_validate(
        {
            "apiVersion": "nhigate.io/v1alpha1",
            "kind": "ProtectedService",
            "metadata": {"name": "pay", "namespace": "shop", "uid": "u"},
            "spec": {"backend": {"service": "payments", "port": 80}, "issuers": ["ci"]},
        }
    )


# --- the builder's output contract (hack/node.sh evals it) ---------------------------------------


def run_builder(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NHIGATE_CACHE": str(cache)}
    return subprocess.run(
        [str(BUILD_SCRIPT), *args], env=env, capture_output=True, text=True, check=True, timeout=60
    )


def contract(stdout: str) -> dict[str, str]:
    lines = stdout.splitlines()
    keys = [line.partition("=")[0] for line in lines]
    assert keys == [
        "NHIGATE_IMAGE_REF",
        "NHIGATE_IMAGE_ARCHIVE",
        "NHIGATE_PAUSE_REF",
        "NHIGATE_PAUSE_ARCHIVE",
    ], stdout
    return dict(line.split("=", 1) for line in lines)


def test_builder_prints_exactly_the_four_lines(tmp_path: Path) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    planned = contract(run_builder(tmp_path, "--print").stdout)
    assert re.fullmatch(
        rf"nhigate\.local/nhigate:{re.escape(version)}-[0-9a-f]{{12}}", planned["NHIGATE_IMAGE_REF"]
    )
    assert re.fullmatch(r"nhigate\.local/pause:[0-9a-f]{12}", planned["NHIGATE_PAUSE_REF"])
    tag = planned["NHIGATE_IMAGE_REF"].rpartition(":")[2]
    assert planned["NHIGATE_IMAGE_ARCHIVE"] == str(tmp_path / "images" / f"nhigate-{tag}.oci.tar")
    assert Path(planned["NHIGATE_PAUSE_ARCHIVE"]).parent == tmp_path / "images"
    assert not (tmp_path / "images").exists()  # --print builds nothing

    # Warm: with both archives in the cache it only prints the same lines (no root, no build).
    (tmp_path / "images").mkdir()
    Path(planned["NHIGATE_IMAGE_ARCHIVE"]).touch()
    Path(planned["NHIGATE_PAUSE_ARCHIVE"]).touch()
    warm = run_builder(tmp_path)
    assert contract(warm.stdout) == planned
    assert "cached" in warm.stderr


# --- Dockerfile parsing -------------------------------------------------------------------------


def test_parse_takes_only_the_final_stage_and_joins_continuations() -> None:
    text = """# syntax=docker/dockerfile:1
ARG BASE=debian
FROM ${BASE} AS build
ENV BUILD_ONLY=1
USER 1000
FROM ${BASE}
ENV A=1 \\
    # a comment inside a continued instruction
    B="two words"
ENV LEGACY value with spaces
LABEL "org.example.a"="x y" b=c
WORKDIR /srv
WORKDIR app
CMD ["serve"]
ENTRYPOINT ["/bin/tool", "--flag"]
USER 65532:65532
"""
    config = oci.parse_dockerfile(text)
    assert config.env == {"A": "1", "B": "two words", "LEGACY": "value with spaces"}
    assert config.labels == {"org.example.a": "x y", "b": "c"}
    assert config.workdir == "/srv/app"
    assert config.entrypoint == ["/bin/tool", "--flag"]
    assert config.cmd == []  # ENTRYPOINT resets an earlier CMD, as in Docker
    assert config.user == "65532:65532"


def test_parse_shell_form_is_wrapped_like_docker() -> None:
    config = oci.parse_dockerfile("FROM scratch\nCMD echo hi\n")
    assert config.cmd == ["/bin/sh", "-c", "echo hi"]


def test_parse_rejects_a_malformed_exec_form() -> None:
    with pytest.raises(ValueError, match="JSON list of strings"):
        oci.parse_dockerfile('FROM scratch\nENTRYPOINT ["a", 1]\n')


# --- rootfs and archive -------------------------------------------------------------------------


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)
    tool = root / "usr" / "bin" / "tool"
    tool.write_text("#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    (root / "usr" / "bin" / "tool-link").symlink_to("tool")
    (root / "usr" / "bin" / "tool-hard").hardlink_to(tool)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    return root


def test_add_user_names_the_uid_once(rootfs: Path) -> None:
    for _ in range(2):  # idempotent
        oci.add_user(
            rootfs,
            name="nonroot",
            uid=65532,
            gid=65532,
            home="/tmp",
            login_shell="/usr/sbin/nologin",
        )
    passwd = (rootfs / "etc" / "passwd").read_text().splitlines()
    group = (rootfs / "etc" / "group").read_text().splitlines()
    assert passwd == [
        "root:x:0:0:root:/root:/bin/bash",
        "nonroot:x:65532:65532::/tmp:/usr/sbin/nologin",
    ]
    assert group == ["root:x:0:", "nonroot:x:65532:"]


def test_add_user_refuses_a_conflicting_entry(rootfs: Path) -> None:
    (rootfs / "etc" / "passwd").write_text("other:x:65532:65532::/:/bin/false\n")
    with pytest.raises(ValueError, match="conflicts"):
        oci.add_user(
            rootfs, name="nonroot", uid=65532, gid=65532, home="/tmp", login_shell="/bin/false"
        )


def read_member(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(name)
    assert f is not None, name
    return f.read()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_archive_is_a_valid_oci_layout(rootfs: Path, tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        'FROM scratch\nENV HOME=/tmp\nUSER 65532:65532\nWORKDIR /tmp\nENTRYPOINT ["tool"]\n'
    )
    out = tmp_path / "out" / "image.oci.tar"
    ref = "nhigate.local/nhigate:0.1.0-abc"
    manifest_digest = oci.pack(rootfs, dockerfile, ref, out, arch="amd64")

    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        assert json.loads(read_member(tar, "oci-layout")) == {"imageLayoutVersion": "1.0.0"}
        index = json.loads(read_member(tar, "index.json"))
        (desc,) = index["manifests"]
        assert desc["digest"] == manifest_digest
        assert desc["mediaType"] == oci.MEDIA_MANIFEST
        assert desc["platform"] == {"architecture": "amd64", "os": "linux"}
        # containerd names the image from this annotation; the OCI one carries only the tag.
        assert desc["annotations"] == {
            "io.containerd.image.name": ref,
            "org.opencontainers.image.ref.name": "0.1.0-abc",
        }

        def blob(d: dict[str, Any]) -> bytes:
            data = read_member(tar, "blobs/sha256/" + d["digest"].removeprefix("sha256:"))
            assert sha(data) == d["digest"]
            assert len(data) == d["size"]
            return data

        manifest = json.loads(blob(desc))
        assert manifest["schemaVersion"] == 2
        assert manifest["config"]["mediaType"] == oci.MEDIA_CONFIG
        config = json.loads(blob(manifest["config"]))
        (layer_desc,) = manifest["layers"]
        assert layer_desc["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        plain = gzip.decompress(blob(layer_desc))
        assert config["rootfs"] == {"type": "layers", "diff_ids": [sha(plain)]}
        assert config["os"] == "linux"
        assert config["architecture"] == "amd64"
        assert config["config"]["User"] == "65532:65532"
        assert config["config"]["Entrypoint"] == ["tool"]
        # `docker load` reads manifest.json.
        (docker,) = json.loads(read_member(tar, "manifest.json"))
        assert docker["RepoTags"] == [ref]
        assert docker["Config"] in names
        assert docker["Layers"] == ["blobs/sha256/" + layer_desc["digest"].removeprefix("sha256:")]

    with tarfile.open(fileobj=io.BytesIO(plain)) as layer:
        members = {mem.name: mem for mem in layer.getmembers()}
    assert list(members) == sorted(members, key=lambda n: n.split("/"))  # parents first, sorted
    assert not any(name.startswith(("/", "./")) for name in members)
    assert members["usr/bin/tool"].mode & 0o111
    assert members["usr/bin/tool-link"].issym()
    assert members["usr/bin/tool-link"].linkname == "tool"
    assert members["usr/bin/tool-hard"].islnk()
    assert members["usr/bin/tool-hard"].linkname == "usr/bin/tool"
    assert members["tmp"].mode & 0o7777 == 0o1777
    assert all(mem.uname == "" and mem.gname == "" for mem in members.values())

    summary = oci.inspect_archive(out)
    assert summary.ref == ref
    assert summary.manifest_digest == manifest_digest
    assert summary.diff_id == sha(plain)


def test_inspect_rejects_a_tampered_blob(rootfs: Path, tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text('FROM scratch\nENTRYPOINT ["tool"]\n')
    good = tmp_path / "good.tar"
    oci.pack(rootfs, dockerfile, "x.local/y:z", good, arch="amd64")
    bad = tmp_path / "bad.tar"
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if data is not None and member.name == "index.json":
                index = json.loads(data)
                index["manifests"][0]["size"] += 1
                data = json.dumps(index).encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    with pytest.raises(ValueError, match="size"):
        oci.inspect_archive(bad)


def test_pack_clamps_times_for_reproducible_layers(rootfs: Path, tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM scratch\n")
    a = oci.pack(rootfs, dockerfile, "x.local/y:1", tmp_path / "a.tar", mtime=0, arch="amd64")
    (rootfs / "usr" / "bin" / "tool").touch()
    b = oci.pack(rootfs, dockerfile, "x.local/y:1", tmp_path / "b.tar", mtime=0, arch="amd64")
    assert a == b


@pytest.mark.parametrize(
    ("ref", "tag"),
    [
        ("nhigate.local/nhigate:0.1.0-abc", "0.1.0-abc"),
        ("localhost:5000/pause", "latest"),
        ("pause:3.10", "3.10"),
    ],
)
def test_ref_tag(ref: str, tag: str) -> None:
    assert oci.ref_tag(ref) == tag


# --- cache key and mirror -----------------------------------------------------------------------


def test_content_hash_follows_content_not_build_litter(tmp_path: Path) -> None:
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    first = oci.content_hash(tmp_path, ["src", "pyproject.toml"])
    (tmp_path / "src" / "pkg" / "__pycache__").mkdir()
    (tmp_path / "src" / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "src" / "pkg.egg-info").mkdir()
    (tmp_path / "src" / "pkg.egg-info" / "PKG-INFO").write_text("x")
    assert oci.content_hash(tmp_path, ["pyproject.toml", "src"]) == first
    (tmp_path / "src" / "pkg" / "a.py").write_text("x = 2\n")
    changed = oci.content_hash(tmp_path, ["src", "pyproject.toml"])
    assert changed != first
    (tmp_path / "src" / "pkg" / "a.py").chmod(0o755)
    assert oci.content_hash(tmp_path, ["src", "pyproject.toml"]) != changed


def test_apt_mirror_reads_deb822_and_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb deb-src\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\n"
    )
    assert oci.apt_mirror("bookworm", tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://list.example/debian bookworm main\n"
    )
    assert oci.apt_mirror("bookworm", tmp_path) == "http://list.example/debian"
    with pytest.raises(LookupError):
        oci.apt_mirror("trixie", tmp_path)
