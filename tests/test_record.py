"""benchmarks/record.py: how a benchmark script rewrites its own block of docs/benchmarks.md."""

from __future__ import annotations

import re
import subprocess

import pytest

from benchmarks.record import (
    NEW_BLOCKS_ABOVE,
    commit,
    machine,
    markdown_table,
    record,
    render_block,
    replace_block,
)

CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n"


def test_record_appends_a_missing_block_then_replaces_only_it(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nintro\n\n<!-- begin other -->\nkeep me\n<!-- end other -->\n\ntail\n")

    record("rollout", markdown_table(["model", "tok/s"], [["1M", 1992]]), title="Rollout", command="python b.py", path=path)
    first = path.read_text()
    assert first.startswith("# Benchmarks\n\nintro\n\n<!-- begin other -->\nkeep me\n<!-- end other -->\n\ntail\n\n")
    assert first.endswith("| 1M | 1992 |\n<!-- end rollout -->\n")
    assert "## Rollout\n\n_Recorded by `python b.py` at commit " in first

    record("rollout", "| model | tok/s |\n| --- | --- |\n| 1M | 2500 |", command="python b.py --again", path=path)
    second = path.read_text()
    assert second.count("<!-- begin rollout -->") == 1 and second.count("<!-- end rollout -->") == 1
    assert "1992" not in second and "| 1M | 2500 |" in second and "`python b.py --again`" in second
    assert second.split("<!-- begin rollout -->")[0] == first.split("<!-- begin rollout -->")[0]


def test_a_new_block_goes_above_the_anchor_line(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text(f"# B\n\n<!-- begin a -->\nold a\n<!-- end a -->\n\n{NEW_BLOCKS_ABOVE}\n\n## By hand\nhistory\n")
    record("b", "new b", command="python b.py", path=path)
    text = path.read_text()
    assert text.index("<!-- end a -->") < text.index("<!-- begin b -->") < text.index(NEW_BLOCKS_ABOVE)
    assert text.endswith(f"new b\n<!-- end b -->\n\n{NEW_BLOCKS_ABOVE}\n\n## By hand\nhistory\n")


def test_record_creates_the_file(tmp_path):
    path = tmp_path / "new.md"
    block = record("memory", "numbers", command="python m.py", path=path)
    assert path.read_text() == block + "\n"
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file was left behind"


def test_provenance_line_names_command_commit_date_machine_and_load(tmp_path):
    path = tmp_path / "b.md"
    block = record("x", "n", command="python benchmarks/x.py --k 1", path=path)
    line = block.splitlines()[1]
    assert re.fullmatch(r"_Recorded by `python benchmarks/x\.py --k 1` at commit ([0-9a-f]{4,}(\+dirty)?|unknown), "
                        r"\d{4}-\d\d-\d\d \d\d:\d\d UTC, on .+, \d+ cores, load average \d+\.\d\._", line), line


def test_machine_reads_the_cpu_model_and_core_count():
    assert machine(CPUINFO, 2) == "AMD EPYC 7B13, 2 cores"
    assert machine("processor\t: 0\n", 4).endswith(", 4 cores")


def git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True, capture_output=True)


def test_commit_is_dirty_for_code_changes_but_not_for_the_benchmarks_page(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "benchmarks.md").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "one")
    head = commit(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{4,}", head)

    (tmp_path / "docs" / "benchmarks.md").write_text("a recorded table\n")
    (tmp_path / "untracked.txt").write_text("scratch\n")
    assert commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert commit(tmp_path) == head + "+dirty"


def test_commit_outside_git_is_unknown(tmp_path):
    assert commit(tmp_path) == "unknown"


@pytest.mark.parametrize("section, markdown, message", [
    ("api load", "n", "section 'api load' must match"),
    ("x", "<!-- end x -->", "contains its own marker"),
])
def test_render_block_refuses_what_would_break_the_next_rewrite(section, markdown, message):
    with pytest.raises(ValueError, match=message):
        render_block(section, markdown, "_p_")


def test_replace_block_refuses_a_begin_without_end():
    with pytest.raises(ValueError, match="<!-- begin x --> has no <!-- end x -->"):
        replace_block("<!-- begin x -->\nold\n", "x", "<!-- begin x -->\nnew\n<!-- end x -->")


def test_markdown_table_names_a_short_row():
    assert markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n| --- | --- |\n| 1 | 2 |"
    with pytest.raises(ValueError, match="row 1 has 1 cells for 2 headers"):
        markdown_table(["a", "b"], [[1, 2], [3]])
