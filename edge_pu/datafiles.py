"""Record files in the formats people keep data in: rows of a file as (place, dict).

`read_records(path, fmt)` yields `Row(n, where, record)` for each record: `n` is the record's
number (a JSONL file's line number, else its row, from 1) and `where` names it in messages
(`prompts.jsonl:7`, `prompts.csv:8 (row 7)`, `prompts.json:12 (row 3)`,
`prompts.parquet: row 7`). Formats, chosen by `fmt` or, for "auto", by the name:
- `jsonl`: one JSON object per line (`.jsonl`, `.ndjson`, and any name not listed here).
- `json`: a JSON array of objects (`.json`; a `.json` file that does not start with `[` is read
  as JSON Lines, which is what `datasets.Dataset.to_json` writes).
- `csv`: a header row, then one record per row (`.csv`; `.tsv` with tabs). Empty cells are
  missing values; a cell holding a JSON list of objects (a `messages` column) is that list.
- `parquet`: `.parquet` / `.pq`, read with pyarrow (`pip install 'edge-pu[data]'`).
- `datasets`: a folder written by `datasets.Dataset.save_to_disk`, read with pyarrow too.
Anything unreadable raises EdgePuError naming the file and the line or row.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgePuError
from .jsonl import iter_jsonl

_SUFFIX = {".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
           ".pq": "parquet"}
_PYARROW_HINT = "pip install 'edge-pu[data]' (pyarrow)"


@dataclass(frozen=True)
class Row:
    n: int  # JSONL: the line; other formats: the record's row, from 1
    where: str  # how messages name the record
    record: dict[str, Any]
    unit: str = "row"  # what `n` counts: "line" or "row"


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "datasets"
    return _SUFFIX.get(path.suffix.lower(), "jsonl")


def read_records(path: str | Path, fmt: str = "auto") -> Iterator[Row]:
    path = Path(path)
    fmt = detect_format(path, fmt)
    if fmt == "datasets":
        yield from _datasets_folder(path)
        return
    if path.is_dir():
        raise EdgePuError(f"{path}: is a folder; give a file (or a folder written by "
                          "datasets' save_to_disk, with data.format: datasets).")
    if fmt == "jsonl":
        for line, rec in iter_jsonl(path, strict=True):
            yield Row(line, f"{path}:{line}", rec, "line")
    elif fmt == "json":
        yield from _json(path)
    elif fmt == "csv":
        yield from _csv(path)
    else:
        yield from _arrow_rows(path, _parquet_batches(path))


def _text(path: Path) -> str:
    """The file as UTF-8 text (a byte-order mark dropped); a bad byte is named by its line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise EdgePuError(f"{path}: file not found.") from None
    except OSError as exc:
        raise EdgePuError(f"{path}: cannot read ({exc.strerror}).") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise EdgePuError(f"{path}:{line}: not UTF-8 (bad byte at offset {exc.start}); save the "
                          "file as UTF-8.") from None


def _json(path: Path) -> Iterator[Row]:
    text = _text(path)
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] != "[":
        yield from (Row(line, f"{path}:{line}", rec, "line")
                    for line, rec in iter_jsonl(path, strict=True))
        return
    # The array is decoded one element at a time, so each record keeps its line number.
    dec = json.JSONDecoder()
    pos, line, seen, n = start + 1, 1, 0, 0

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i: int, what: str) -> EdgePuError:
        at = text.count("\n", 0, i) + 1
        return EdgePuError(f"{path}:{at}: invalid JSON ({what}).")

    pos = skip(pos)
    if text[pos:pos + 1] == "]":
        pos += 1
    else:
        while True:
            try:
                rec, end = dec.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise EdgePuError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column "
                                  f"{exc.colno}).") from None
            line += text.count("\n", seen, pos)
            seen, n = pos, n + 1
            where = f"{path}:{line} (row {n})"
            if not isinstance(rec, dict):
                raise EdgePuError(f"{where}: expected a JSON object, got {type(rec).__name__}.")
            yield Row(n, where, rec)
            pos = skip(end)
            if text[pos:pos + 1] == ",":
                pos = skip(pos + 1)
                continue
            if text[pos:pos + 1] == "]":
                pos += 1
                break
            raise fail(pos, "expected ',' or ']' after a record")
    if skip(pos) != len(text):
        raise fail(skip(pos), "text after the closing ']'")


def _csv(path: Path) -> Iterator[Row]:
    text = _text(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return
        names = [h.strip() for h in header]
        dup = next((h for h in names if names.count(h) > 1 and h), None)
        if dup:
            raise EdgePuError(f"{path}:1: column {dup!r} appears twice in the header.")
        n, last = 0, reader.line_num
        for cells in reader:
            first, last = last + 1, reader.line_num
            if not any(c.strip() for c in cells):
                continue  # a blank line
            n += 1
            where = f"{path}:{first} (row {n})"
            if len(cells) != len(names):
                raise EdgePuError(f"{where}: {len(cells)} cells, but the header has "
                                  f"{len(names)} columns ({', '.join(names)}).")
            rec: dict[str, Any] = {}
            for name, cell in zip(names, cells, strict=True):
                rec[name] = None if cell == "" else _messages_cell(cell)
            yield Row(n, where, rec)
    except csv.Error as exc:
        raise EdgePuError(f"{path}:{reader.line_num}: not valid CSV ({exc}).") from None


def _messages_cell(cell: str) -> Any:
    """A cell holding a JSON list of objects (a messages column) as that list; any other cell,
    a prompt that merely starts with '[' included, as its text."""
    if not cell.lstrip().startswith("["):
        return cell
    try:
        value = json.loads(cell)
    except json.JSONDecodeError:
        return cell
    ok = isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
    return value if ok else cell


def _pyarrow(path: Path, what: str) -> Any:
    try:
        import pyarrow
    except ImportError:
        raise EdgePuError(f"{path}: reading {what} needs pyarrow: {_PYARROW_HINT}.") from None
    return pyarrow


def _parquet_batches(path: Path) -> Iterator[Any]:
    _pyarrow(path, "Parquet")
    import pyarrow.parquet as pq

    if not path.exists():
        raise EdgePuError(f"{path}: file not found.")
    try:
        yield from pq.ParquetFile(path).iter_batches(batch_size=1024)
    except (OSError, ValueError) as exc:  # pyarrow.ArrowException subclasses both
        raise EdgePuError(f"{path}: not a readable Parquet file ({exc}).") from None


def _datasets_folder(path: Path) -> Iterator[Row]:
    """A `datasets.Dataset.save_to_disk` folder, read with pyarrow alone.

    Why not `datasets.load_from_disk`: the `datasets` wheel brings pandas, huggingface-hub, an
    HTTP stack, dill, multiprocess and xxhash (about 100 MB) and reads the Hub's environment
    settings on import, to load what is plain Arrow: save_to_disk writes `state.json`, whose
    `_data_files` lists the shards in order, each an Arrow IPC stream of the dataset's rows
    (indices already applied). The tests check this reader against folders the real
    `save_to_disk` writes. A DatasetDict folder (`dataset_dict.json`, one subfolder per split)
    is read when it holds one split; otherwise the split's folder must be named.
    """
    if not path.exists():
        raise EdgePuError(f"{path}: folder not found.")
    if not path.is_dir():
        raise EdgePuError(f"{path}: data.format is datasets, but this is not a folder; give the "
                          "folder that Dataset.save_to_disk wrote.")
    splits_file = path / "dataset_dict.json"
    if splits_file.exists() and not (path / "state.json").exists():
        splits = _json_file(splits_file).get("splits") or []
        if len(splits) != 1:
            raise EdgePuError(f"{path}: a DatasetDict with splits {', '.join(map(str, splits))};"
                              f" name one, e.g. data.prompts: {path / str(splits[0])}"
                              if splits else f"{splits_file}: lists no splits.")
        path = path / str(splits[0])
    state_file = path / "state.json"
    if not state_file.exists():
        raise EdgePuError(f"{path}: is a folder, but not one written by datasets' save_to_disk "
                          "(no state.json); give a JSONL, JSON, CSV or Parquet file, or that "
                          "folder.")
    files = _json_file(state_file).get("_data_files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and "filename" in f
                                              for f in files):
        raise EdgePuError(f"{state_file}: no \"_data_files\" list of {{\"filename\"}}; not a "
                          "save_to_disk folder this reader knows.")
    yield from _arrow_rows(path, _stream_batches(path, [path / f["filename"] for f in files]))


def _json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as exc:
        raise EdgePuError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}).") from None
    if not isinstance(data, dict):
        raise EdgePuError(f"{path}: expected a JSON object.")
    return data


def _stream_batches(folder: Path, shards: list[Path]) -> Iterator[Any]:
    pa = _pyarrow(folder, "a datasets folder")
    for shard in shards:
        try:
            with pa.OSFile(str(shard), "rb") as fh:
                yield from pa.ipc.open_stream(fh)
        except FileNotFoundError:
            raise EdgePuError(f"{shard}: listed in state.json but missing.") from None
        except (OSError, ValueError) as exc:
            raise EdgePuError(f"{shard}: not a readable Arrow stream ({exc}).") from None


def _arrow_rows(path: Path, batches: Iterator[Any]) -> Iterator[Row]:
    n = 0
    for batch in batches:
        for rec in batch.to_pylist():
            n += 1
            yield Row(n, f"{path}: row {n}", rec)
