"""The project's modules import one way: no circle, and no project import hidden in a function.

Reads the sources with `ast`, so a circle is found even where a function-level import would
keep it from failing at run time.
"""
import ast

from conftest import ROOT

# Optional dependencies may be imported where they are used; project modules may not.
PROJECT = sorted(p.stem for p in ROOT.glob('*.py'))


def project_imports(path):
    """{imported project module: (line, at module level?)} of one source file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name.split('.')[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split('.')[0]]
        else:
            continue
        for name in names:
            if name in PROJECT and name != path.stem:
                found.setdefault(name, (node.lineno, id(node) in top_level))
    return found


def import_graph():
    return {name: project_imports(ROOT / f'{name}.py') for name in PROJECT}


def find_cycle(graph):
    """One import circle as a list of modules (first == last), or None."""
    state = {}  # name -> 'open' while on the current path, 'done' after

    def visit(name, path):
        state[name] = 'open'
        for dep in sorted(graph[name]):
            if state.get(dep) == 'open':
                return path[path.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep, path + [dep])
                if cycle:
                    return cycle
        state[name] = 'done'
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [name])
            if cycle:
                return cycle
    return None


def test_find_cycle_names_a_circle():
    graph = {'a': {'b': (1, True)}, 'b': {'c': (1, True)}, 'c': {'a': (3, False)}, 'd': {}}
    assert find_cycle(graph) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b': (1, True)}, 'b': {}}) is None


def test_project_imports_form_no_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, 'import circle: ' + ' -> '.join(f'{m}.py' for m in cycle)


def test_no_project_module_is_imported_inside_a_function():
    hidden = [f'{name}.py:{line} imports {dep}' for name, deps in import_graph().items()
              for dep, (line, top) in deps.items() if not top]
    assert not hidden, '; '.join(hidden)


def test_the_method_is_not_importing_the_scripts():
    # Library modules never load a script: importing evaluate.py must not load main.py, and
    # nothing but hubconf.py and bench.py may import main.py or evaluate.py.
    graph = import_graph()
    importers = {name for name, deps in graph.items() if {'main', 'evaluate', 'pack'} & set(deps)}
    assert importers <= {'hubconf', 'bench'}, sorted(importers)
