"""Imports point one way: scripts -> library -> data and models (dataset, images, model...) -> utils.

Every project module (the .py files at the root and in benchmarks/) is read with `ast`; its imports
of project modules are collected wherever they stand, an import inside a function counting as one at
the top: a lazy import still ties two modules together.
"""
import ast
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_DATASET_LINES = 700
# Scripts that are libraries too: ARCHITECTURE puts copy-paste's objects in the library row (train.py
# pastes with them), and demo.py's builder is what dataset.ensure_demo runs to build the default data
# root on first use. Importing either defines functions and runs nothing, so the data layer may use them.
LIBRARY_SCRIPTS = {"copy_paste", "demo"}


def module_paths():
    """{module name: path} of the project's modules; benchmarks/ puts the root on sys.path, so one namespace."""
    paths = glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "benchmarks", "*.py"))
    return {os.path.basename(path)[:-3]: path for path in paths}


def read(path):
    with open(path) as f:
        return f.read()


def imported_modules(source, project):
    """The project modules a module's source imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & project


def is_script(source):
    return 'if __name__ == "__main__":' in source


def is_benchmark(path):
    return os.path.basename(os.path.dirname(path)) == "benchmarks"


PATHS = module_paths()
SOURCES = {name: read(path) for name, path in PATHS.items()}
GRAPH = {name: imported_modules(source, set(PATHS)) - {name} for name, source in SOURCES.items()}
SCRIPTS = {name for name, source in SOURCES.items() if is_script(source)}


def find_cycle(graph):
    """One import cycle as a list of modules (its first one repeated at the end), or None."""
    done, path = set(), []

    def visit(name):
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        path.append(name)
        for imported in sorted(graph[name]):
            cycle = visit(imported)
            if cycle:
                return cycle
        path.pop()
        done.add(name)
        return None

    return next((cycle for cycle in map(visit, sorted(graph)) if cycle), None)


def test_the_graph_is_read_from_every_module():
    assert {"dataset", "utils", "report", "train", "compare_runs", "bench_throughput"} <= set(GRAPH)
    assert {"train", "inference", "pseudo_label", "dataset_tool", "compare_runs", "demo"} <= SCRIPTS


def test_find_cycle_sees_a_cycle_through_a_function_level_import():
    source = "import utils\n\ndef f():\n    import report\n"
    graph = {"dataset": imported_modules(source, {"utils", "report", "dataset"}), "report": {"dataset"}, "utils": set()}
    assert find_cycle(graph) == ["dataset", "report", "dataset"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_two_modules_import_each_other_even_through_others():
    assert find_cycle(GRAPH) is None


def test_no_module_imports_a_script():
    """Benchmarks may drive scripts (that is what they measure); the library and data layers never do."""
    offenders = sorted((name, imported) for name, imports in GRAPH.items() if not is_benchmark(PATHS[name])
                       for imported in imports if imported in SCRIPTS - LIBRARY_SCRIPTS)
    assert offenders == []


COMMAND_LINE = {"main", "get_args_parser"}


def command_line_uses(source, scripts):
    """(script, name) for each use of a script's command line (`demo.main`, `from train import get_args_parser`)."""
    uses = set()
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and node.attr in COMMAND_LINE and isinstance(node.value, ast.Name)
                and node.value.id in scripts):
            uses.add((node.value.id, node.attr))
        elif isinstance(node, ast.ImportFrom) and node.module in scripts:
            uses.update((node.module, alias.name) for alias in node.names if alias.name in COMMAND_LINE)
    return uses


def test_command_line_uses_are_seen():
    assert command_line_uses("import demo\ndemo.main(args)\nfrom train import get_args_parser\ndemo.make_demo()\n",
                             {"demo", "train"}) == {("demo", "main"), ("train", "get_args_parser")}


def test_no_script_runs_another_scripts_command_line():
    """ARCHITECTURE: a script may import what a library script builds with (demo.make_demo), never its command line."""
    offenders = sorted((name, use) for name, source in SOURCES.items() if not is_benchmark(PATHS[name])
                       for use in command_line_uses(source, SCRIPTS - {name}))
    assert offenders == []


def test_utils_imports_nothing_of_ours():
    assert GRAPH["utils"] == set()


def test_dataset_stays_under_700_lines():
    lines = SOURCES["dataset"].count("\n")
    assert lines < MAX_DATASET_LINES, f"dataset.py has {lines} lines: move a concern out (see its opening comment)"
