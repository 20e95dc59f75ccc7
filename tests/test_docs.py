"""The documentation: docs/ builds with MkDocs in strict mode (every warning, a broken link or anchor
among them, is an error), the README stays a front door (at most 250 lines, the two commands at the
top, a recipe that loads), and the kinds' parameter tables are generated from the params models: a
field added to a kind's params model is in the built page without another edit.

MkDocs is the venv's (`bash install.sh --test` installs the docs extra), or the one CHLA_MKDOCS names.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chla_launcher.contract.kinds import registry

from .helpers import REPO

README_MAX_LINES = 250
# A field the docs test adds to train_spm's params model, in a copy of the launcher.
PROBE_FIELD = '    docs_probe_window: int = Field(64, ge=1, description="lines the docs test shuffles together")\n'
PROBE_ANCHOR = '    seed: int = Field(0, description="seed of the line sampling")\n'


def mkdocs() -> str:
    path = os.environ.get("CHLA_MKDOCS") or str(Path(sys.executable).parent / "mkdocs")
    if not Path(path).exists():
        pytest.fail(f"{path} is missing: run `bash install.sh --test` (the docs extra)")
    return path


def build(config: Path, site: Path, python_path_first: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if python_path_first is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(python_path_first), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [mkdocs(), "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def kind_section(kinds_page: str, name: str) -> str:
    """The HTML of one kind's section of the built kinds page: from its heading to the next kind's."""
    heading = f'<h3 id="{name}">'
    assert heading in kinds_page, f"the built kinds page has no section for kind {name}"
    start = kinds_page.index(heading)
    end = kinds_page.find("<h3 ", start + 1)
    return kinds_page[start : end if end != -1 else len(kinds_page)]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The repository's docs, built as CI builds them."""
    site = tmp_path_factory.mktemp("site")
    result = build(REPO / "mkdocs.yml", site)
    assert result.returncode == 0, result.stderr[-3000:]
    return site


@pytest.fixture(scope="module")
def kinds_page(site) -> str:
    return (site / "kinds" / "index.html").read_text(encoding="utf-8")


def test_docs_build_strict_with_every_parameter_of_every_kind(site, kinds_page):
    for name, kind in registry().items():
        section = kind_section(kinds_page, name)
        for field in kind.params.model_fields:
            assert f"<code>{field}</code>" in section, (name, field)
    # a description with markup characters comes through as written (escaped, not emphasis or a tag)
    assert "lines sampled from the inputs for training" in kind_section(kinds_page, "train_spm")
    assert "chla_&lt;file stem&gt;" in kind_section(kinds_page, "evaluate")
    # no Markdown escape shows through on any page (GitHub's table escape `\|` is literal here)
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "\\|" not in text and "\\_" not in text, page


def test_a_broken_anchor_fails_the_strict_build(tmp_path):
    """The control of the build above: the same configuration, with one link to an anchor that does
    not exist, must fail (anchor checks are not MkDocs' default)."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "docs", copy / "docs")
    shutil.copy(REPO / "mkdocs.yml", copy / "mkdocs.yml")
    with (copy / "docs" / "index.md").open("a", encoding="utf-8") as page:
        page.write("\nSee [a kind that is not there](kinds.md#no-such-kind).\n")
    result = build(copy / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-kind" in result.stderr


def test_a_field_added_to_a_params_model_is_in_the_docs_without_another_edit(kinds_page, tmp_path):
    """A copy of the launcher whose train_spm params model has one field more, first on the import
    path of a fresh build: the built train_spm section shows it, name, type, default and description;
    the repository's own build (the control) does not."""
    overlay = tmp_path / "overlay"
    shutil.copytree(REPO / "launcher", overlay / "chla_launcher", ignore=shutil.ignore_patterns("__pycache__"))
    module = overlay / "chla_launcher" / "kinds" / "train_spm.py"
    source = module.read_text(encoding="utf-8")
    assert source.count(PROBE_ANCHOR) == 1
    module.write_text(source.replace(PROBE_ANCHOR, PROBE_ANCHOR + PROBE_FIELD), encoding="utf-8")

    result = build(REPO / "mkdocs.yml", tmp_path / "site", python_path_first=overlay)
    assert result.returncode == 0, result.stderr[-3000:]
    section = kind_section((tmp_path / "site" / "kinds" / "index.html").read_text(encoding="utf-8"), "train_spm")
    row = re.search(r"<tr>\s*<td><code>docs_probe_window</code></td>(.*?)</tr>", section, re.DOTALL)
    assert row, section
    assert "<code>int</code> (&gt;= 1)" in row.group(1)
    assert "<code>64</code>" in row.group(1)
    assert "lines the docs test shuffles together" in row.group(1)

    assert "docs_probe_window" not in kinds_page


def test_the_readme_is_a_front_door(tmp_path):
    from chla_launcher.contract.recipe import load_recipe

    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move reference text into docs/"
    top = "\n".join(lines[:20])
    assert "bash install.sh && .venv/bin/chla-submit recipes/demo.yaml" in top
    assert "bash install.sh --test && bash tests/run.sh" in top
    # its recipe example loads as written (paths given as a user would)
    block = re.search(r"^```yaml\n(.*?)^```", "\n".join(lines) + "\n", re.DOTALL | re.MULTILINE)
    assert block
    recipe_file = tmp_path / "zh.yaml"
    recipe_file.write_text(block.group(1), encoding="utf-8")
    (tmp_path / "base").mkdir()
    (tmp_path / "zh.txt").write_text("中文\n", encoding="utf-8")
    recipe = load_recipe(recipe_file, [f"vars.base_model={tmp_path / 'base'}", "vars.zh_corpus=[zh.txt]"], cwd=tmp_path)
    assert recipe.stages["pt1"].params.mode == "embeddings"
    assert recipe.stages["tokens"].params.inputs == [str(tmp_path / "zh.txt")]
