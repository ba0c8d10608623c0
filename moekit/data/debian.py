"""Real text from Debian packages: fortune cookie files and translated manual pages.

Packages are fetched with ``apt-get download`` (no root needed once the package lists exist;
as root, a missing list triggers one ``apt-get update``) and unpacked with ``dpkg-deb -x`` into a
cache folder. dpkg (which holds dpkg-deb) is an Essential package on every Debian-based system,
so each machine with apt-get has it; a machine without both reports the packages as unavailable
and the corpus build falls back to its Python-only corpus. Parsers turn fortune files (entries
separated by lines holding ``%``) and roff manual pages into plain-text documents.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .sources import DataError, Document, LoadReport, read_text_file


@dataclass
class FetchResult:
    debs: dict[str, Path]
    missing: dict[str, str]
    notes: list[str]


def _apt_download(packages: list[str], dest: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", "download", *packages], cwd=dest, capture_output=True, text=True,
                          timeout=600)


def fetch_debs(packages: list[str], dest: str | Path) -> FetchResult:
    """Download ``packages`` as .deb files into ``dest`` (kept as a cache; present files are reused).

    Tries ``apt-get download``; if it fails because package lists are missing and we are root,
    runs ``apt-get update`` once and retries. Packages still missing are returned with the reason;
    without ``dpkg-deb`` (needed to unpack them) every package is missing, cached or not.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if shutil.which("dpkg-deb") is None:
        why = ("apt-get is not available on this machine" if shutil.which("apt-get") is None
               else "dpkg-deb is not available on this machine (needed to unpack .deb files)")
        return FetchResult({}, {p: why for p in packages}, notes)
    debs = {p: d for p in packages if (d := _find_deb(dest, p)) is not None}
    todo = [p for p in packages if p not in debs]
    missing: dict[str, str] = {}
    if todo:
        if shutil.which("apt-get") is None:
            return FetchResult(debs, {p: "apt-get is not available on this machine" for p in todo}, notes)
        result = _apt_download(todo, dest)
        if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            notes.append("apt-get download failed (" + _last_line(result.stderr) + "); ran apt-get update")
            subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=600)
            result = _apt_download(todo, dest)
        if result.returncode != 0:
            # One unknown package fails the whole command: fetch the rest one by one.
            for p in todo:
                single = _apt_download([p], dest)
                if single.returncode != 0:
                    missing[p] = _last_line(single.stderr)
        for p in todo:
            if p not in missing:
                deb = _find_deb(dest, p)
                if deb is None:
                    missing[p] = "apt-get reported success but no .deb was written"
                else:
                    debs[p] = deb
    return FetchResult(debs, missing, notes)


def _find_deb(folder: Path, package: str) -> Path | None:
    found = sorted(folder.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def unpack_deb(deb: str | Path, dest: str | Path) -> Path:
    """Extract a .deb's files into ``dest`` with ``dpkg-deb -x``; returns dest.

    Extraction goes to a temporary sibling folder that is renamed into place at the end, so a
    half-unpacked package is never taken for a complete one.
    """
    deb, dest = Path(deb), Path(dest)
    if dest.is_dir():
        return dest
    if shutil.which("dpkg-deb") is None:
        raise DataError(f"cannot unpack {deb}: dpkg-deb is not installed (it comes with dpkg on Debian-based systems)")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    result = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot unpack {deb}: {_last_line(result.stderr)}")
    os.replace(tmp, dest)
    return dest


# ---------------------------------------------------------------------- parsers
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def parse_fortunes(text: str) -> list[str]:
    """Entries of a fortune file: separated by lines that hold only ``%``; colour codes removed."""
    entries = re.split(r"(?m)^%\s*$", _ANSI.sub("", text))
    return [e.strip("\n") for e in entries if e.strip()]


def fortune_files(root: Path) -> list[Path]:
    """Regular fortune files under an unpacked package (no .dat indexes, no symlinks)."""
    base = root / "usr/share/games/fortunes"
    if not base.is_dir():
        return []
    return sorted(p for p in base.rglob("*")
                  if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8") and not p.name.startswith("."))


_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),      # font changes
    (re.compile(r"\\s[+-]?\d"), ""),                    # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),     # strings
    (re.compile(r"\\\(em|\\\(en"), "-"),
    (re.compile(r"\\\(lq|\\\(rq|\\\(dq"), '"'),
    (re.compile(r"\\\(aq|\\\(oq|\\\(cq"), "'"),
    (re.compile(r"\\\([A-Za-z]{2}"), ""),
    (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\[&|^%:c]"), ""),
    (re.compile(r"\\ "), " "),
]
_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB", "TH", "IP", "UR", "MT", "Nm",
                "Nd", "Ar", "Fl", "Pa", "Dq", "Sh"}


def roff_to_text(source: str) -> str:
    """Plain text of a man page: comments and layout requests dropped, text macros unwrapped."""
    out = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].strip().partition(" ")
            if macro in ("PP", "LP", "P", "sp", "SH", "SS", "Sh", "Pp") and out and out[-1]:
                out.append("")
            if macro not in _TEXT_MACROS or not rest.strip():
                continue
            line = rest.replace('"', "")
            if macro == "TH":
                line = line.split(" ")[0]
        for pattern, repl in _ROFF_ESCAPES:
            line = pattern.sub(repl, line)
        out.append(line)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def man_pages(root: Path, lang: str) -> list[Path]:
    base = root / "usr/share/man" / lang
    if not base.is_dir():
        return []
    return sorted(p for p in base.rglob("*") if p.is_file() and not p.is_symlink())


def package_documents(root: Path, label: str, report: LoadReport) -> list[Document]:
    """Documents of an unpacked fortunes-* or manpages-* package: one per fortune / man page."""
    docs = []
    for path in fortune_files(root):
        text = read_text_file(path, report)
        if text is None:
            continue
        docs += [Document(entry, label, f"{path}#{i}") for i, entry in enumerate(parse_fortunes(text))]
    for lang_dir in sorted((root / "usr/share/man").glob("*")) if (root / "usr/share/man").is_dir() else []:
        if not lang_dir.is_dir() or lang_dir.name.startswith("man"):
            continue
        for path in man_pages(root, lang_dir.name):
            try:
                raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            except (OSError, EOFError) as err:
                report.notes.append(f"skipped {path}: {err}")
                continue
            report.files += 1
            text = raw.decode("utf-8", errors="replace")
            if "\ufffd" in text:
                report.replaced_bytes_files.append(str(path))
            if text.lstrip().startswith(".so "):
                continue
            plain = roff_to_text(text)
            if plain.strip():
                docs.append(Document(plain, label, str(path)))
    return docs
