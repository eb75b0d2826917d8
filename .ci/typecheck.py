"""Type-check the code under the module names it is installed as.

pyproject.toml maps `tinyfleet.server` to server/ (and so on: [tool.setuptools] package-dir), and the
editable install resolves that with an import hook, which mypy does not run. So mypy reads a tree of
links laid out as the installed package (build/typecheck/tinyfleet/server -> server/), and the files it
reports are named back as they are in the repository.

Run: `python .ci/typecheck.py [PATH ...]` (default: every package; PATHs, files or folders in the
repository, check those and what they import).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = Path("build/typecheck")


def package_dirs() -> dict[str, str]:
    """Installed package name -> folder in the repository, from pyproject.toml."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(config["tool"]["setuptools"]["package-dir"])


def lay_out_tree(dirs: dict[str, str]) -> dict[str, str]:
    """Links every mapped folder at its installed place; returns tree path prefix -> repository prefix."""
    tree = ROOT / TREE
    shutil.rmtree(tree, ignore_errors=True)  # links only: rmtree does not follow them
    prefixes = {}
    for name, folder in sorted(dirs.items(), key=lambda item: item[0].count(".")):
        place = tree / name.replace(".", "/")
        mapped_children = {other.rsplit(".", 1)[1] for other in dirs if other.startswith(name + ".")}
        if mapped_children:
            # A package whose children live elsewhere: a real folder holding links to its own files.
            place.mkdir(parents=True, exist_ok=True)
            for entry in (ROOT / folder).iterdir():
                if entry.name not in mapped_children and entry.name != "__pycache__":
                    (place / entry.name).symlink_to(entry)
        else:
            place.parent.mkdir(parents=True, exist_ok=True)
            place.symlink_to(ROOT / folder, target_is_directory=True)
        prefixes[f"{TREE}/{name.replace('.', '/')}/"] = f"{folder}/"
    return prefixes


def in_tree(path: str, prefixes: dict[str, str]) -> str:
    """The tree path of a repository path (server/x.py -> build/typecheck/tinyfleet/server/x.py)."""
    relative = Path(path).resolve().relative_to(ROOT).as_posix().rstrip("/") + "/"
    for tree_prefix, repo_prefix in sorted(prefixes.items(), key=lambda item: -len(item[1])):
        if relative.startswith(repo_prefix):
            return (tree_prefix + relative.removeprefix(repo_prefix)).rstrip("/")
    raise SystemExit(f"{path} is in no package of [tool.setuptools] package-dir")


def main(paths: list[str]) -> int:
    prefixes = lay_out_tree(package_dirs())
    targets = [in_tree(path, prefixes) for path in paths] if paths else ["-p", "tinyfleet"]
    run = subprocess.run(
        [sys.executable, "-m", "mypy", *targets], cwd=ROOT, capture_output=True, text=True, check=False
    )
    pattern = re.compile("^(" + "|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True)) + ")")
    for line in (run.stdout + run.stderr).splitlines():
        print(pattern.sub(lambda match: prefixes[match.group(1)], line))
    return run.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
