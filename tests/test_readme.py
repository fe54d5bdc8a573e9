"""README.md and docs/ stay true: the set-up commands are the ones CI runs, the README is a short front door, and
every command, flag, Python example, repository path and link they show exists (the `sdpo_loss` example runs)."""
import argparse
import ast
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch

from sdpo_fast.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
ALL_PAGES = [*PAGES, ROOT / "BENCHMARKS.md"]
MAX_README_LINES = 200
# Flags of other programs the pages show (pip, pytest, torchrun), never checked against sdpo-fast's parser.
OTHER_FLAGS = {"--benchmark-only", "--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-backend",
               "--rdzv-endpoint", "--no-python"}
PATH_PREFIXES = ("sdpo_fast/", "kernels/", "tests/", "benchmarks/", "scripts/", "examples/", "docs/")


def setup_commands() -> list[str]:
    text = README.read_text()
    block = re.search(r"## Set-up[^\n]*\n+```bash\n(.*?)```", text, re.S)
    assert block, "README has no Set-up bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), re.M | re.S)


def prose(path: Path) -> str:
    """The page without its fenced blocks."""
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)


def inline_code(path: Path) -> list[str]:
    return re.findall(r"`([^`\n]+)`", prose(path))


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def all_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = {s for s in parser._option_string_actions if s.startswith("--")}
    for sub in subcommands(parser).values():
        flags |= all_flags(sub)
    return flags


def expand(flag: str) -> list[str]:
    """`--[no-]x` is `--x` and `--no-x`; `--x=1` is `--x`."""
    flag = flag.split("=")[0]
    return [flag.replace("[no-]", ""), flag.replace("[no-]", "no-")] if "[no-]" in flag else [flag]


def sdpo_fast_commands(path: Path) -> list[list[str]]:
    """The tokens after `sdpo-fast` of each command shown: shell lines of bash blocks and inline code spans."""
    lines = []
    for language, body in code_blocks(path):
        if language in ("bash", "sh", ""):
            lines += body.replace("\\\n", " ").splitlines()
    lines += [span for span in inline_code(path) if span.startswith("sdpo-fast ")]
    commands = []
    for line in lines:
        tokens = shlex.split(line.replace("…", "..."), comments=True)
        while "sdpo-fast" in tokens:
            tokens = tokens[tokens.index("sdpo-fast") + 1:]
            end = next((i for i, t in enumerate(tokens) if t in ("|", ">", "&&", ";", "||")), len(tokens))
            commands.append(tokens[:end])
            tokens = tokens[end:]
    return commands


def unknown_in(command: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """The sub-commands and flags of one command that the parser does not have."""
    unknown, tokens = [], list(command)
    while (choices := subcommands(parser)) and tokens and not tokens[0].startswith("-") and tokens[0] != "...":
        names = tokens.pop(0).split("|")
        unknown += [f"sub-command {name}" for name in names if name not in choices]
        if names[0] not in choices:
            return unknown
        parser = choices[names[0]]
    for token in tokens:
        if token.startswith("--") or token.startswith("[--"):
            unknown += [f for f in expand(token.strip("[]")) if f not in parser._option_string_actions]
    return unknown


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    main_job, tests = setup_commands()
    assert main_job.startswith("pip install torch==2.13.0 ") and "sdpo-fast" in main_job
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_readme_is_a_short_front_door_opening_with_the_setup_commands():
    assert len(README.read_text().splitlines()) <= MAX_README_LINES
    language, body = code_blocks(README)[0]
    assert language == "bash" and [line for line in body.splitlines() if line.strip()] == setup_commands()
    assert len(setup_commands()) == 2


def test_the_readme_layout_map_names_every_layer_and_only_existing_folders():
    from test_layers import RANK

    block = next(body for language, body in code_blocks(README) if language == "text")
    folders = [t for line in block.splitlines() for t in line.split() if t.endswith("/")]
    missing = [f for f in folders if not (ROOT / f).is_dir() and not (ROOT / "sdpo_fast" / f).is_dir()]
    assert not missing, missing
    shown = {Path(f).name for f in folders}
    assert not set(RANK) - {"constants", "utils", "testing"} - shown
    assert {"benchmarks", "tests", "scripts", "docs"} <= shown


def test_every_docs_page_is_listed_in_the_index_and_the_readme_links_the_index():
    index = (DOCS / "index.md").read_text()
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert pages and not {p for p in pages if f"({p})" not in index}
    assert "(docs/index.md)" in README.read_text()


@pytest.mark.parametrize("path", ALL_PAGES, ids=lambda p: p.name)
def test_every_sdpo_fast_command_shown_has_its_subcommands_and_flags(path):
    parser = build_parser()
    commands = sdpo_fast_commands(path)
    unknown = {" ".join(c): u for c in commands if (u := unknown_in(c, parser))}
    assert not unknown, unknown


@pytest.mark.parametrize("path", ALL_PAGES, ids=lambda p: p.name)
def test_every_flag_named_in_the_prose_exists(path):
    known = all_flags(build_parser()) | OTHER_FLAGS
    named = {f for span in inline_code(path) for token in span.split() if token.startswith("--")
             for f in expand(token.strip("[],.;:"))}
    assert not named - known, sorted(named - known)


def test_the_flag_checks_can_fail():
    parser = build_parser()
    assert unknown_in(["train", "--lora-r", "16", "--no-such-flag"], parser) == ["--no-such-flag"]
    assert unknown_in(["online", "curve|nope", "--persona", "x"], parser) == ["sub-command nope"]
    assert unknown_in(["online", "curve", "--[no-]distillation-add-tail"], parser) == []
    assert unknown_in(["train", "--[no-]lora-r"], parser) == ["--no-lora-r"]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_every_python_example_parses(path):
    for language, body in code_blocks(path):
        if language == "python":
            ast.parse(body)


def test_the_readme_sdpo_loss_example_runs_and_matches_plain_pytorch():
    example = next(body for language, body in code_blocks(README) if language == "python" and "sdpo_loss(" in body)
    torch.manual_seed(0)
    scope = {}
    exec(compile(example, "README.md", "exec"), scope)
    h, th, w, y = (scope[k] for k in ("student_hidden", "teacher_hidden", "lm_head_weight", "target_ids"))
    h_ref, w_ref = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    log_pi = torch.log_softmax(h_ref @ w_ref.T, -1).gather(1, y[:, None])[:, 0]
    log_q = torch.log_softmax(th @ w_ref.detach().T, -1).gather(1, y[:, None])[:, 0]
    advantages = (log_q - log_pi).detach()
    reference = -(advantages * log_pi).mean()
    reference.backward()
    torch.testing.assert_close(scope["loss"].detach(), reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scope["stats"].advantages, advantages, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces as `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(path), re.M):
        base = slug(heading)
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


def broken_links(path: Path) -> list[str]:
    """The relative links and images of the page whose file, or heading anchor, does not exist."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(path)):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("path", ALL_PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_to_an_existing_file_and_anchor(path):
    assert not broken_links(path)


def test_the_link_check_can_fail(tmp_path):
    (tmp_path / "other.md").write_text("# A `title`, here\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-title-here) [ok](other.md#twice-1) [ok](#self) [web](https://x.org/y)\n"
                    "[gone](missing.md) [bad anchor](other.md#twice-2) ![image](missing.png)\n\n# Self\n")
    assert broken_links(page) == ["missing.md", "other.md#twice-2", "missing.png"]


def test_slugs_follow_github():
    assert slug("Peak GPU memory of a training step, simulated (`sdpo-fast plan`; `python benchmarks/"
                "plan_table.py`)") == ("peak-gpu-memory-of-a-training-step-simulated-sdpo-fast-plan-python-"
                                        "benchmarksplan_tablepy")
    assert slug("One process vs a torchrun job") == "one-process-vs-a-torchrun-job"


@pytest.mark.parametrize("path", ALL_PAGES, ids=lambda p: p.name)
def test_every_repository_path_named_exists(path):
    named = {token.rstrip(".,;:)").split("::")[0] for span in inline_code(path) for token in span.split()
             if token.startswith(PATH_PREFIXES)}
    missing = sorted(p for p in named if not any(c in p for c in "*<{N") and not (ROOT / p).exists())
    assert not missing, missing


def _plan_table():
    spec = importlib.util.spec_from_file_location("plan_table", ROOT / "benchmarks" / "plan_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_plan_table_lives_between_its_markers_in_benchmarks_only(tmp_path):
    plan_table = _plan_table()
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert text.count(plan_table.BEGIN) == 1 and text.count(plan_table.END) == 1
    table = text.split(plan_table.BEGIN)[1].split(plan_table.END)[0]
    header = plan_table.markdown([], 24.0)
    assert table.strip().startswith(header)
    for page in PAGES:
        assert header.splitlines()[0] not in page.read_text(), f"{page.name} copies the plan table"
    target = tmp_path / "B.md"
    target.write_text(f"before\n{plan_table.BEGIN}\nold table\n{plan_table.END}\nafter\n")
    plan_table.write_between_markers(target, "| new |")
    assert target.read_text() == f"before\n{plan_table.BEGIN}\n| new |\n{plan_table.END}\nafter\n"
    target.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        plan_table.write_between_markers(target, "| new |")


def test_plan_table_main_writes_its_rows_into_benchmarks(tmp_path, monkeypatch, capsys):
    plan_table = _plan_table()
    row = dict(configuration="LoRA r16", gpus=1, micro_batch_tokens=4160, student_tokens=[4032, 4032],
               peak_gib=18.3, total_gib=19.8, fits=True, peak_phase="backward", seconds=1.0)
    target = tmp_path / "BENCHMARKS.md"
    target.write_text(f"# B\n{plan_table.BEGIN}\n{plan_table.END}\n")
    monkeypatch.setattr(plan_table, "BENCHMARKS", target)
    monkeypatch.setattr(plan_table, "rows", lambda model, budget, tokens: [row])
    monkeypatch.setattr("sys.argv", ["plan_table.py", "--tokens", "4160"])
    plan_table.main()
    assert target.read_text() == (f"# B\n{plan_table.BEGIN}\n{plan_table.markdown([row], 24.0)}\n{plan_table.END}\n")
    assert "| LoRA r16 | 4160 | 2 x 4032 | 18.30 | 19.80 | yes | backward |" in target.read_text()
    assert "1 rows written" in capsys.readouterr().out
