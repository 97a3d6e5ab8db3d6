"""Pack an ImageFolder tree (DIR/train, DIR/val) into one HDF5 file: one file to copy and open.

    python pack.py /path/to/imagenet /path/to/imagenet.h5             # train and val, all checked
    python pack.py /path/to/imagenet /path/to/imagenet.h5 --skip-bad  # leave unreadable images out
    python pack.py --check /path/to/imagenet.h5                       # decode every stored image
    python main.py /path/to/imagenet.h5                               # then use it where DIR goes

The file holds the original encoded bytes (no re-encoding), the labels, the class names and the
file names, in torchvision ImageFolder's order; data.py describes the layout and reads it
(`PackedImageFolder`). Every image is decoded once by PIL in `--workers` processes before it is
stored. Progress is committed every `--commit-every` images: rerunning an interrupted command
continues where it stopped.
"""
import collections
import contextlib
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from cli import (USER_ERRORS, ArgumentParser, InputError, error_line, non_negative_int,
                 positive_int)
from data import (PACK_FORMAT, PACK_SUFFIXES, PACK_VERSION, check_folder_links,
                  check_split_arrays, decode_rgb, hdf5_reason, import_tables, open_pack,
                  read_strings)

PROGRESS_SECONDS = 10
CHUNK = 16  # images per job sent to a worker


def get_arguments():
    parser = ArgumentParser(
        description='Pack an ImageFolder tree (DIR/train, DIR/val) into one HDF5 file',
        epilog='Rerun the same command to resume an interrupted pack.', prog='pack.py')
    parser.add_argument('source', type=Path, nargs='?', metavar='DIR',
                        help='the dataset folder, holding DIR/<split>/<class>/<image>')
    parser.add_argument('output', type=Path, nargs='?', metavar='FILE',
                        help='the HDF5 file to write (.h5 or .hdf5 for main.py to recognise it)')
    parser.add_argument('--splits', nargs='+', default=['train', 'val'], metavar='SPLIT',
                        help='subfolders of DIR to pack (default: train val)')
    parser.add_argument('--workers', type=non_negative_int,
                        default=min(8, os.cpu_count() or 1),
                        help='processes that read and decode images (default: min(8, CPUs); '
                             '0 reads in the main process)')
    parser.add_argument('--skip-bad', action='store_true',
                        help='leave unreadable images out (listed at the end) instead of stopping')
    parser.add_argument('--commit-every', type=positive_int, default=1000, metavar='N',
                        help='make progress durable every N images (default: 1000)')
    parser.add_argument('--check', type=Path, metavar='FILE',
                        help='instead of packing: check FILE and decode every image in it '
                             '(default: pack)')
    return parser


def main(argv=None):
    parser = get_arguments()
    args = parser.parse_args(argv)
    if args.check is not None and (args.source or args.output):
        parser.error('--check FILE takes no DIR or output FILE')
    if args.check is None and args.output is None:
        parser.error('give the dataset folder DIR and the output FILE (or --check FILE)')
    repeated = sorted({s for s in args.splits if args.splits.count(s) > 1})
    if repeated:
        parser.error(f'--splits names {", ".join(repeated)} twice')
    try:
        if args.check is not None:
            check(args.check, args.workers)
        else:
            pack(args)
    except USER_ERRORS as e:
        sys.exit(f'pack.py: error: {error_line(e)}')
    except KeyboardInterrupt:
        sys.exit('pack.py: interrupted; rerun the same command to continue')


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------

def pack(args):
    """Check the output, list every split (a missing val fails in seconds, not after train),
    then pack. A rerun continues where the last commit left off; a file from another source or
    with other files is refused (split_group)."""
    if not args.source.is_dir():
        raise InputError(f'source directory {args.source} does not exist')
    check_output(args.output)
    tables = import_tables(args.output)
    listings = {split: list_split(args.source, split) for split in args.splits}
    if args.output.suffix.lower() not in PACK_SUFFIXES:
        print(f'pack.py: warning: main.py and evaluate.py recognise a packed file by its name '
              f'ending in {" or ".join(PACK_SUFFIXES)}', file=sys.stderr)
    try:
        with worker_pool(args.workers) as pool, open_output(args.output) as h5:
            record_splits(h5, args.splits)
            skipped = []
            for split, listing in listings.items():
                skipped += pack_split(h5, split, args.source / split, listing, args, pool)
    except (OSError, tables.HDF5ExtError) as e:  # a full disk, an I/O error: never "done"
        raise InputError(f'cannot write {args.output}: {write_reason(e, args.output)}; rerun '
                         f'the command to continue from the last commit (if the rerun finds '
                         f'the file damaged, write to a new file)') from None
    verify_written(args.output, args.splits)
    if skipped:
        print(f'skipped {len(skipped)} unreadable image(s), not in {args.output}:', file=sys.stderr)
        for name in skipped:
            print(f'  {name}', file=sys.stderr)
    print(f'{args.output}: done ({", ".join(args.splits)}; PyTables {tables.__version__})',
          file=sys.stderr)


def write_reason(error, path):
    """Why writing `path` failed: HDF5's trace names the cause deep inside; a full disk often
    only shows as missing free space."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    try:
        stats = os.statvfs(path.parent)
        if stats.f_bavail * stats.f_frsize < 1 << 20:
            return 'No space left on device'
    except OSError:
        pass
    return hdf5_reason(error)


def record_splits(h5, splits):
    """The root attribute `splits`: every split any run of the command was asked to pack, so
    that --check (and the final verification) can tell a split that is missing altogether."""
    listed = json.loads(getattr(h5.root._v_attrs, 'splits', '[]'))
    h5.root._v_attrs.splits = json.dumps(listed + [s for s in splits if s not in listed])
    sync(h5)


def verify_written(path, splits):
    """Read back what the file now holds: every split finished, consistent, and its data the
    bytes that were appended (their CRC-32, recorded at each commit). HDF5 can lose writes on a
    full disk without an error; this is what tells."""
    try:
        with open_pack(path) as h5:
            for split in splits:
                check_split_arrays(h5, path, split)
                check_data_crc(h5, path, split)
    except InputError as e:
        reason = write_reason(InputError(''), path)
        if reason == 'No space left on device':  # the likely cause: say so, not only the effect
            raise InputError(f'cannot write {path}: {reason}, and what was written is '
                             f'incomplete ({e}); HDF5 may have lost writes silently: free space '
                             f'and write to a new file') from None
        raise


def check_data_crc(h5, path, split):
    group = h5.get_node(f'/{split}')
    expected = getattr(group._v_attrs, 'crc32', None)
    if expected is None:  # written before CRCs were recorded
        return
    if data_crc(group.data, group.data.nrows) != int(expected):
        raise InputError(f'{path}:{split}: the stored images are not the bytes that were '
                         f'written (CRC-32 differs; a full disk or an I/O error lost some); '
                         f'write to a new file')


def data_crc(array, end, start=0, crc=0, block=1 << 26):
    for i in range(start, end, block):
        crc = zlib.crc32(array.read(i, min(i + block, end)).tobytes(), crc)
    return crc


def list_split(source, split):
    """(classes, [(name, label, path)]) in torchvision ImageFolder's order; name: <class>/<file>."""
    folder = source / split
    if not folder.is_dir():
        raise InputError(f'{folder} not found: expected the ImageFolder layout '
                         f'{source}/{split}/<class>/<image>')
    check_folder_links(folder)
    try:
        classes, class_to_idx = find_classes(folder)
        samples = make_dataset(folder, class_to_idx, IMG_EXTENSIONS)
    except FileNotFoundError as e:  # no class folder, or a class folder without images
        raise InputError(f'{folder}: {e}'.replace('\n', ' ')) from None
    items = [(Path(p).relative_to(folder).as_posix(), t, p) for p, t in samples]
    for name in classes + [name for name, _, _ in items]:
        check_utf8(folder, name)
    return classes, items


def check_utf8(folder, name):
    """Names are stored as UTF-8; a name that is not (undecodable bytes, which Python keeps as
    surrogates) is refused before anything is written."""
    try:
        name.encode('utf-8')
    except UnicodeEncodeError:
        shown = os.fsencode(name).decode('utf-8', 'replace')
        raise InputError(f'{folder}/{shown}: the name is not valid UTF-8 (undecodable bytes '
                         f'shown as \ufffd); rename it, e.g. with convmv, and rerun') from None


def check_output(path):
    """Before the source is listed (minutes on ImageNet): the output can be written there."""
    if path.is_dir():
        raise InputError(f'cannot write {path}: it is a directory')
    if not path.parent.is_dir():
        raise InputError(f'cannot write {path}: directory {path.parent} does not exist')


def open_output(path):
    """The output opened for appending; a file that pack.py did not write is never touched."""
    tables = import_tables(path)
    check_output(path)
    if path.exists() and never_started(path):
        path.unlink()  # left by a pack that failed before writing anything (a full disk)
    if path.exists():
        h5 = open_pack(path, 'a')
        if h5.root._v_attrs.version != PACK_VERSION:
            h5.close()
            raise InputError(f'{path} was written by another version of pack.py '
                             f'(format {h5.root._v_attrs.version}); write to a new file')
        return h5
    try:
        h5 = tables.open_file(str(path), 'w')
    except (OSError, tables.HDF5ExtError) as e:
        path.unlink(missing_ok=True)  # HDF5 may have created it before failing
        raise InputError(f'cannot write {path}: {write_reason(e, path)}') from None
    try:
        h5.root._v_attrs.format = PACK_FORMAT
        h5.root._v_attrs.version = PACK_VERSION
        sync(h5)
    except (OSError, tables.HDF5ExtError) as e:
        with contextlib.suppress(OSError, tables.HDF5ExtError):
            h5.close()
        path.unlink(missing_ok=True)  # nothing in it: a rerun must not find it refused
        raise InputError(f'cannot write {path}: {write_reason(e, path)}') from None
    return h5


def never_started(path):
    """An empty file, or an HDF5 file with no node and no attribute: what a pack that failed to
    start leaves; nothing in it can be lost."""
    if path.stat().st_size == 0:
        return True
    tables = import_tables(path)
    try:
        if not tables.is_hdf5_file(str(path)):
            return False
        with tables.open_file(str(path), 'r') as h5:
            return not h5.root._v_children and not h5.root._v_attrs._v_attrnamesuser
    except (OSError, tables.HDF5ExtError):
        return False


def pack_split(h5, split, folder, listing, args, pool):
    """Append the split's images from where the last run committed; returns the skipped names."""
    classes, items = listing
    group = split_group(h5, split, folder, classes, items)
    attrs = group._v_attrs
    skipped = json.loads(attrs.skipped)
    if attrs.complete:
        print(f'{split}: already packed ({attrs.packed} images)', file=sys.stderr)
        return skipped
    start = int(attrs.scanned)
    print(f'{split}: {len(items)} images in {len(classes)} classes from {folder}'
          + (f', continuing after {start}' if start else ''), file=sys.stderr, flush=True)
    progress = Progress(split, start, len(items))
    end = int(group.offsets[-1])  # bytes stored so far
    crc = stored_crc(group, end)
    # An interruption (Ctrl-C, kill) anywhere below loses at most the records since the last
    # commit: the next run cuts them off (split_group) and reads those files again.
    paths = [path for _, _, path in items[start:]]
    jobs = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    results = ordered_map(read_checked_many, jobs, pool, backlog=4 * args.workers)
    try:
        for k, (data, error) in enumerate(itertools.chain.from_iterable(results), start=start):
            name, label, _ = items[k]
            if error is not None:
                if not args.skip_bad:
                    commit(group, k, skipped, crc)
                    raise InputError(f'{error} (replace or remove the file and rerun, or rerun '
                                     f'with --skip-bad to leave it out)')
                print(f'skipping: {error}', file=sys.stderr, flush=True)
                skipped.append(f'{split}/{name}')
            else:
                end = append(group, data, label, name, end)
                crc = zlib.crc32(data, crc)
            if (k + 1 - start) % args.commit_every == 0:
                commit(group, k + 1, skipped, crc)
            progress.update(k + 1, end)
    finally:
        results.close()  # no more jobs for the pool
    commit(group, len(items), skipped, crc, complete=True)
    progress.update(len(items), end, force=True)
    return skipped


def split_group(h5, split, folder, classes, items):
    """The split's group, created, or checked against the source and cut back to its last commit.

    A crash can leave records appended after the last commit (`scanned`, `packed`); they are
    removed, so a record counts only once its commit is on disk.
    """
    if f'/{split}' in h5 and not is_whole_group(h5.get_node(f'/{split}')):
        h5.remove_node(f'/{split}', recursive=True)  # cut short while being created: no commit
    if f'/{split}' not in h5:
        try:
            return create_split_group(h5, split, folder, classes, items)
        except BaseException:
            if f'/{split}' in h5:  # all or nothing: no half-built group for a rerun to trip on
                h5.remove_node(f'/{split}', recursive=True)
            raise
    group = h5.get_node(f'/{split}')
    attrs = group._v_attrs
    where = f'{h5.filename}:{split}'
    if attrs.source != str(folder.resolve()):
        raise InputError(f'{where} was packed from {attrs.source}, not {folder.resolve()}; '
                         f'refusing to mix them (write to a new file)')
    if read_strings(group.classes) != classes:
        raise InputError(f'{where} has other classes than {folder}; refusing to mix them '
                         f'(write to a new file)')
    packed, scanned = int(attrs.packed), int(attrs.scanned)
    longest = max(items[scanned:], key=lambda item: len(item[0].encode('utf-8')), default=None)
    if longest and len(longest[0].encode('utf-8')) > group.names.atom.itemsize:
        raise InputError(f'{where} cannot hold the name {longest[0]} (added to {folder} since '
                         f'the pack began: at most {group.names.atom.itemsize} bytes); write to '
                         f'a new file')
    group.offsets.truncate(packed + 1)
    group.labels.truncate(packed)
    group.names.truncate(packed)
    group.data.truncate(int(group.offsets[packed]))
    h5.flush()
    skipped = set(json.loads(attrs.skipped))
    expected = [(name, label) for name, label, _ in items[:scanned]
                if f'{split}/{name}' not in skipped]
    stored = list(zip(read_strings(group.names), group.labels.read().tolist()))
    if len(items) < scanned or stored != expected or (attrs.complete and scanned != len(items)):
        differ = next((f'{a[0]} / {b[0]}' for a, b in zip(stored, expected) if a != b),
                      f'{len(stored)} images packed, the folder lists {len(items)}')
        raise InputError(f'{where} holds other files than {folder} now has (first difference: '
                         f'{differ}); refusing to mix them (write to a new file)')
    return group


SPLIT_ARRAYS = ('data', 'offsets', 'labels', 'names', 'classes')
SPLIT_ATTRS = ('source', 'scanned', 'packed', 'skipped', 'complete')


def is_whole_group(group):
    return all(name in group for name in SPLIT_ARRAYS) and \
        all(name in group._v_attrs._v_attrnames for name in SPLIT_ATTRS)


def create_split_group(h5, split, folder, classes, items):
    tables = import_tables(h5.filename)
    group = h5.create_group('/', split)
    n = len(items)
    width = max(len(name.encode('utf-8')) for name, _, _ in items)
    h5.create_earray(group, 'data', tables.UInt8Atom(), (0,), chunkshape=(1 << 18,))
    h5.create_earray(group, 'offsets', tables.Int64Atom(), (0,), expectedrows=n + 1) \
        .append(np.zeros(1, np.int64))
    h5.create_earray(group, 'labels', tables.Int64Atom(), (0,), expectedrows=n)
    h5.create_earray(group, 'names', tables.StringAtom(width), (0,), expectedrows=n)
    h5.create_array(group, 'classes', np.array([c.encode('utf-8') for c in classes]))
    group._v_attrs.source = str(folder.resolve())
    group._v_attrs.scanned = group._v_attrs.packed = 0
    group._v_attrs.skipped = '[]'
    group._v_attrs.complete = False
    sync(h5)
    return group


def append(group, data, label, name, end):
    """Append one image whose bytes start at `end`; returns the new end."""
    group.data.append(np.frombuffer(data, np.uint8))
    group.labels.append(np.array([label], np.int64))
    group.names.append(np.array([name.encode('utf-8')]))
    group.offsets.append(np.array([end + len(data)], np.int64))
    return end + len(data)


def stored_crc(group, end):
    """CRC-32 of the data committed so far (recorded by commit; computed for older files)."""
    recorded = getattr(group._v_attrs, 'crc32', None)
    return int(recorded) if recorded is not None else data_crc(group.data, end)


def commit(group, scanned, skipped, crc, complete=False):
    """Make the records appended so far durable, then record how many there are (and the
    CRC-32 of their bytes, which the final verification and --check compare)."""
    h5 = group._v_file
    with deferred_sigint():  # Ctrl-C must not leave `packed` updated and `scanned` not
        sync(h5)  # the records first: a commit on disk never counts records that are not
        attrs = group._v_attrs
        attrs.packed = group.labels.nrows
        attrs.scanned = scanned
        attrs.skipped = json.dumps(skipped)
        attrs.crc32 = crc
        attrs.complete = complete
        sync(h5)
    if write_reason(InputError(''), Path(h5.filename)) == 'No space left on device':
        # HDF5 can drop writes on a full disk without an error: stop before it drops more
        raise InputError(f'cannot write {h5.filename}: No space left on device; free space and '
                         f'rerun the command (if the rerun finds the file damaged, write to a '
                         f'new file)')


def sync(h5):
    h5.flush()  # HDF5's buffers to the operating system
    fd = os.open(h5.filename, os.O_RDONLY)  # and on to the disk (fsync acts on the file)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def deferred_sigint():
    """Ctrl-C during the block takes effect when it ends."""
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    except ValueError:  # not the main thread: signals go elsewhere anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


def read_checked(path):
    """(encoded bytes, None) for an image PIL decodes, else (None, one-line error naming it)."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
        decode_rgb(data, path)
        return data, None
    except OSError as e:
        return None, f'cannot read image {path}: {e.strerror or e}'
    except InputError as e:
        return None, str(e)


def read_checked_many(paths):
    return [read_checked(p) for p in paths]


@contextlib.contextmanager
def worker_pool(workers):
    """`workers` processes for `ordered_map` (0: None, work in this process). Start it before
    opening the HDF5 file: a forked worker would inherit the file's descriptor, and its lock."""
    if workers == 0:
        yield None
        return
    # Workers ignore Ctrl-C: the main process handles it, and the pool ends with it.
    with multiprocessing.Pool(workers, signal.signal, (signal.SIGINT, signal.SIG_IGN)) as pool:
        yield pool


def ordered_map(fn, jobs, pool, backlog):
    """fn(job) for each job, in order, computed in the pool (None: here) with at most `backlog`
    jobs in flight: results never pile up in memory ahead of the writer."""
    if pool is None:
        yield from map(fn, jobs)
        return
    pending = collections.deque()
    for job in jobs:
        pending.append(pool.apply_async(fn, (job,)))
        if len(pending) >= backlog:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class Progress:
    """A line on stderr every PROGRESS_SECONDS: images done, rate, size, ETA."""

    def __init__(self, split, start, total):
        self.split, self.start, self.total = split, start, total
        self.done = start
        self.t0 = self.last = time.time()

    def update(self, done, nbytes, force=False):
        self.done = done
        now = time.time()
        if not force and now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float('inf')
        eta = time.strftime('%H:%M:%S', time.gmtime(eta)) if eta < 86400 * 365 else '?'
        print(f'{self.split}: {done}/{self.total} images ({100 * done / max(self.total, 1):.1f}%), '
              f'{rate:.0f} images/s, {nbytes / 1e9:.2f} GB, ETA {eta}', file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Checking a packed file
# ---------------------------------------------------------------------------------------------

def check(path, workers):
    """Every split finished and consistent, and every stored image decodes."""
    bad = []
    with worker_pool(workers) as pool:
        with open_pack(path) as h5:
            splits = claimed_splits(h5)
            if not splits:
                raise InputError(f'{path} holds no split')
            sizes = {split: check_split_arrays(h5, path, split) for split in splits}
        for split, n in sizes.items():
            t0 = time.time()
            jobs = [(str(path), split, i, min(i + 256, n)) for i in range(0, n, 256)]
            split_bad = [error for errors in ordered_map(decode_range, jobs, pool, 2 * workers)
                         for error in errors]
            bad += split_bad
            print(f'{path}:{split}: {n - len(split_bad)} of {n} images decode '
                  f'({n / max(time.time() - t0, 1e-9):.0f} images/s)', file=sys.stderr,
                  flush=True)
    if bad:
        raise InputError(f'{len(bad)} stored image(s) do not decode; first: {bad[0]}')
    with open_pack(path) as h5:  # every image decodes: are they the bytes that were packed?
        for split in splits:
            check_data_crc(h5, path, split)
    print(f'{path}: OK', file=sys.stderr)


def claimed_splits(h5):
    """The splits the file says it holds (the root's `splits`, which every pack records before
    writing), and any other group in it."""
    listed = json.loads(getattr(h5.root._v_attrs, 'splits', '[]'))
    present = sorted(g._v_name for g in h5.iter_nodes('/', 'Group'))
    return listed + [s for s in present if s not in listed]


def decode_range(job):
    path, split, begin, end = job
    errors = []
    with open_pack(path, chunk_cache_size=0) as h5:
        group = h5.get_node(f'/{split}')
        offsets = group.offsets.read(begin, end + 1)
        names = group.names.read(begin, end)
        for i in range(end - begin):
            data = group.data.read(offsets[i], offsets[i + 1]).tobytes()
            try:
                decode_rgb(data, f'{path}:{split}/{names[i].decode("utf-8")}')
            except InputError as e:
                errors.append(str(e))
    return errors


if __name__ == '__main__':
    main()
