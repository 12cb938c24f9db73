import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands_install_and_run_then_test():
    install_and_run, test = quick_start_commands()
    assert "pip install" in install_and_run and install_and_run.endswith("depthgrow compare")
    assert '".[test]"' in test and test.endswith("pytest")


def test_ci_runs_the_quick_start_test_command():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quick_start_commands()[1] in lines  # run as a line of its own, exactly as the README writes it


def test_the_library_example_runs():
    example = re.search(r"### As a library.*?```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README example", "exec"), namespace)
    assert namespace["model"].config.n_layer == 12
    assert len(namespace["new_names"]) == 12 * 12  # twelve fresh blocks of twelve tensors


def test_the_growth_methods_example_runs():
    example = re.search(r"### Growth methods.*?```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README growth methods example", "exec"), namespace)
    assert namespace["plan"].target_depth == 8


def test_every_image_the_docs_show_is_in_the_repository():
    for page in (ROOT / "README.md", ROOT / "docs" / "results.md"):
        images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text())
        assert images, page
        for image in images:
            assert (page.parent / image).is_file(), f"{page.name} shows {image}, which is not in the repository"


def test_the_config_table_is_the_one_the_code_renders():
    from depthgrow.config import config_table, load_config

    table = config_table(load_config())
    # regenerate: replace the README's table with print(depthgrow.config.config_table(load_config()))
    assert f"\n\n{table}\n\n" in README, "the README's config table differs from config_table(load_config())"
