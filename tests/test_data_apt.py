"""apt-get download path of the Debian corpus builder: the update-and-retry logic with faked
commands, and (where apt-get exists and the package lists are in place) one real download."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from moekit.data import debian


class FakeApt:
    """Stands in for `apt-get download`/`apt-get update`: downloads fail until an update ran;
    ``unknown`` packages always fail."""

    def __init__(self, unknown: tuple[str, ...] = ()) -> None:
        self.updated = False
        self.calls: list[list[str]] = []
        self.unknown = unknown

    def download(self, packages: list[str], dest: Path) -> subprocess.CompletedProcess:
        self.calls.append(["download", *packages])
        bad = [p for p in packages if p in self.unknown]
        if not self.updated or bad:
            reason = f"E: Unable to locate package {(bad or packages)[0]}"
            return subprocess.CompletedProcess([], 100, "", reason + "\n")
        for p in packages:
            (dest / f"{p}_1.0_all.deb").write_bytes(b"!<arch>\n")
        return subprocess.CompletedProcess([], 0, "", "")

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        assert cmd == ["apt-get", "update"]
        self.calls.append(["update"])
        self.updated = True
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture
def fake_apt(monkeypatch):
    def install(root: bool, unknown: tuple[str, ...] = ()) -> FakeApt:
        apt = FakeApt(unknown)
        monkeypatch.setattr(debian.shutil, "which", lambda name: "/usr/bin/" + name)
        monkeypatch.setattr(debian, "_apt_download", apt.download)
        monkeypatch.setattr(debian.subprocess, "run", apt.run)
        monkeypatch.setattr(debian.os, "geteuid", lambda: 0 if root else 1000)
        return apt
    return install


def test_missing_lists_as_root_run_one_update_then_retry(tmp_path, fake_apt):
    apt = fake_apt(root=True)
    result = debian.fetch_debs(["fortunes-de", "fortunes-ru"], tmp_path)
    assert apt.calls == [["download", "fortunes-de", "fortunes-ru"], ["update"],
                         ["download", "fortunes-de", "fortunes-ru"]]
    assert sorted(result.debs) == ["fortunes-de", "fortunes-ru"] and result.missing == {}
    assert any("ran apt-get update" in n for n in result.notes)
    again = debian.fetch_debs(["fortunes-de", "fortunes-ru"], tmp_path)
    assert apt.calls[3:] == [] and again.debs == result.debs  # cached .debs are reused


def test_without_root_no_update_and_every_package_reported(tmp_path, fake_apt):
    apt = fake_apt(root=False)
    result = debian.fetch_debs(["fortunes-de", "fortunes-ru"], tmp_path)
    assert ["update"] not in apt.calls
    assert result.debs == {}
    assert result.missing["fortunes-ru"] == "E: Unable to locate package fortunes-ru"


def test_one_unknown_package_does_not_lose_the_others(tmp_path, fake_apt):
    apt = fake_apt(root=True, unknown=("fortunes-xx",))
    result = debian.fetch_debs(["fortunes-de", "fortunes-xx"], tmp_path)
    assert apt.calls.count(["update"]) == 1
    assert list(result.debs) == ["fortunes-de"]
    assert result.missing == {"fortunes-xx": "E: Unable to locate package fortunes-xx"}


def _apt_lists_present() -> bool:
    lists = Path("/var/lib/apt/lists")
    return lists.is_dir() and any(p.name.endswith("_Packages") for p in lists.iterdir())


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt-get is not available (not a Debian-like machine)")
@pytest.mark.skipif(not _apt_lists_present(), reason="no apt package lists in /var/lib/apt/lists (run apt-get update)")
def test_real_apt_get_download_and_unpack(tmp_path):
    result = debian.fetch_debs(["fortunes-it"], tmp_path / "debs")
    if "fortunes-it" in result.missing:
        pytest.skip(f"apt-get download failed (no network to the archive?): {result.missing['fortunes-it']}")
    root = debian.unpack_deb(result.debs["fortunes-it"], tmp_path / "unpacked")
    from moekit.data.sources import LoadReport

    docs = debian.package_documents(root, "it", LoadReport())
    assert len(docs) > 100 and all(d.label == "it" for d in docs)
