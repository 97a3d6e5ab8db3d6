"""Tests that start processes end them the one clean way (tests/ranks.py).

A multi-process test that tears its group down while a peer still talks to it, or that waits
for its ranks without a deadline, fails or hangs at random; one that passes 29 runs in 30
still turns CI red. So no test module starts ranks or leaves a process group by itself: they
go through ranks.spawn (every rank waited for, with a deadline) and ranks.group or
distributed.launch (a barrier before the group is destroyed).
"""
import ast

from conftest import ROOT

# calls that start ranks or tear a group down, and the only module allowed to make them
RANK_CALLS = {'spawn', 'start_processes', 'Process', 'destroy_process_group'}
HELPER = 'ranks.py'


def calls(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', None)
            owner = func.value.id if isinstance(func, ast.Attribute) and \
                isinstance(func.value, ast.Name) else None
            yield node, name, owner


def test_only_the_helper_starts_ranks_or_destroys_groups():
    offenders = []
    for path in sorted((ROOT / 'tests').glob('*.py')):
        if path.name == HELPER:
            continue
        for node, name, owner in calls(path):
            if name in RANK_CALLS and owner != 'ranks':
                offenders.append(f'{path.name}:{node.lineno}: {owner}.{name}(...)')
            # a group over TCP has several ranks: ranks.group leaves it cleanly; a group of
            # one (HashStore) may be set up in place
            if name == 'init_process_group' and \
                    any(k.arg == 'init_method' for k in node.keywords):
                offenders.append(f'{path.name}:{node.lineno}: init_process_group(init_method=...)')
    assert not offenders, 'use tests/ranks.py instead:\n' + '\n'.join(offenders)


def test_the_checker_finds_what_it_looks_for(tmp_path):
    # the check above is only as good as its parsing: show it catching each form
    sample = tmp_path / 'sample.py'
    sample.write_text('import torch.multiprocessing as mp\n'
                      'mp.spawn(f, (), nprocs=2)\n'
                      'dist.destroy_process_group()\n'
                      'dist.init_process_group("gloo", init_method="tcp://x:1", rank=0)\n'
                      'ranks.spawn(f, ())\n')
    found = [(name, owner) for _, name, owner in calls(sample)
             if name in RANK_CALLS | {'init_process_group'}]
    assert found == [('spawn', 'mp'), ('destroy_process_group', 'dist'),
                     ('init_process_group', 'dist'), ('spawn', 'ranks')]
