"""Read prompt files (.txt, .csv, .tsv, .jsonl) into rows, reporting malformed rows with their line numbers.

Formats:
    .txt    one prompt per line; blank lines and lines starting with ``#`` are skipped; outer whitespace is
            stripped; quotes and apostrophes are literal.
    .csv    a header row with a ``prompt`` column (any case); standard CSV quoting; the delimiter (``,``, ``;``,
            tab or ``|``) is sniffed from the start of the file (:func:`sniff_delimiter`), ``,`` when unsure.
    .tsv    the same with tabs and no quoting at all (a field may start with ``"``, as in PartiPrompts.tsv).
    .jsonl  one JSON object per line with a ``prompt`` string; blank lines are skipped.
All are UTF-8 with or without a BOM, or UTF-16/UTF-32 with a BOM (what Windows tools write as "Unicode"), with
LF, CRLF or CR line ends. A file without a known suffix, or prompts read from stdin (``dalle batch -``), take
their format from ``--input-format``; stdin defaults to txt (:data:`STDIN_NAME`; relative ``image``/``mask``
paths of stdin rows are relative to the working folder).

Per-row settings (CSV/TSV columns or JSONL keys, empty or null = not set): ``negative_prompt``, ``seed``
(seed of the row's image 0), ``n``, ``steps``, ``guidance``, ``width``, ``height``; ``image`` (an init image:
image to image), ``mask`` (with ``image``: inpainting, white = repaint) and ``strength`` (in (0, 1]), whose
paths are relative to the prompt file's folder and must exist; ``num_images`` and ``guidance_scale`` are
accepted as other names. Other columns and keys are ignored and listed in
:attr:`PromptFile.ignored_fields`.

Every record (a prompt line, a data row, a JSON line; blank and comment lines excluded) gets a ``row`` number,
0-based, whether it is valid or not, so that row numbers, seeds and shards do not move when a malformed row is
skipped or fixed.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from dallecli.engine.request import field_problem
from dallecli.errors import UsageError

FORMATS = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
FORMAT_NAMES = ("txt", "csv", "tsv", "jsonl")
STDIN_NAME = "<stdin>"  # the PromptFile.path of prompts read from stdin
CSV_DELIMITERS = (",", ";", "\t", "|")  # what sniff_delimiter chooses from, in order of preference
SNIFF_BYTES = 64 * 1024  # how much of a CSV file csv.Sniffer reads
# byte-order marks, longest first (UTF-32 LE starts with UTF-16 LE's)
_BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le", "UTF-32"), (b"\x00\x00\xfe\xff", "utf-32-be", "UTF-32"),
         (b"\xff\xfe", "utf-16-le", "UTF-16"), (b"\xfe\xff", "utf-16-be", "UTF-16"))
SETTING_FIELDS = ("negative_prompt", "seed", "n", "steps", "guidance", "width", "height", "image", "mask", "strength")
FIELD_ALIASES = {"num_images": "n", "guidance_scale": "guidance"}
MAX_IMAGES_PER_ROW = 1000  # also the row stride of the seed formula in dallecli.batch.plan
_LINE_BREAK = re.compile(rb"\r\n|\n|\r")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class PromptRow:
    """A valid prompt record.

    Attributes:
        row: 0-based index of the record in the file (malformed records counted, blank/comment lines not).
        line: 1-based line number where the record starts.
        prompt: the prompt, outer whitespace stripped.
        settings: the per-row settings given, by name in :data:`SETTING_FIELDS` (only those set).
    """

    row: int
    line: int
    prompt: str
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class InvalidRow:
    """A malformed record: where it is and what is wrong with it."""

    row: int
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class PromptFile:
    """A parsed prompt file: its valid rows, its malformed rows, and the columns/keys it ignored."""

    path: Path
    format: str
    rows: list[PromptRow]
    invalid: list[InvalidRow]
    ignored_fields: list[str] = field(default_factory=list)
    delimiter: str | None = None  # the CSV/TSV delimiter used; None for txt and jsonl
    encoding: str = "utf-8"  # "utf-8", or the UTF-16/UTF-32 of a file with such a BOM


def read_prompt_file(path: Path, fmt: str | None = None) -> PromptFile:
    """Read and validate a whole prompt file.

    Args:
        path: a .txt, .csv, .tsv or .jsonl file (any name with ``fmt``).
        fmt: "txt", "csv", "tsv" or "jsonl" (``--input-format``); None: from the suffix.

    Returns:
        A :class:`PromptFile`; malformed records are in ``invalid``, not raised.

    Raises:
        UsageError: the file is missing or unreadable, has an unknown suffix and no ``fmt``, ``fmt`` is not a
            format, the text is not UTF-8 or UTF-16/32 with a BOM (CSV/TSV), has no ``prompt`` column (CSV/TSV)
            or broken CSV quoting.
    """
    path = Path(path)
    fmt = check_format(fmt) if fmt is not None else FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"{path.name}: unknown prompt file type '{path.suffix}'; use .txt, .csv, .tsv or .jsonl, "
                         "or pass --input-format txt|csv|tsv|jsonl")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"prompt file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    return parse_prompts(data, fmt, path)


def check_format(fmt: str) -> str:
    """Check an ``--input-format`` value (any case) and return it in lower case.

    Raises:
        UsageError: not one of :data:`FORMAT_NAMES`.
    """
    name = str(fmt).strip().lower().lstrip(".")
    if name not in FORMAT_NAMES:
        raise UsageError(f"--input-format '{fmt}' is not a prompt format; use one of {', '.join(FORMAT_NAMES)}")
    return name


def parse_prompts(data: bytes, fmt: str, path: Path | str = "<input>") -> PromptFile:
    """Parse the bytes of a prompt file (or of stdin) in format ``fmt`` ("txt", "csv", "tsv" or "jsonl").

    Args:
        data: the raw bytes: UTF-8 with or without a BOM, or UTF-16/UTF-32 with a BOM.
        fmt: the format.
        path: where the bytes came from (:data:`STDIN_NAME` for stdin): named in messages, and the folder of
            relative ``image``/``mask`` paths.

    Raises:
        UsageError: as :func:`read_prompt_file`.
    """
    path = Path(path)
    fmt = check_format(fmt)
    data, encoding = _to_utf8(data, path)
    if fmt == "txt":
        parsed = _parse_txt(data, path)
    elif fmt == "jsonl":
        parsed = _resolve_inputs(_parse_jsonl(data, path))
    else:
        parsed = _resolve_inputs(_parse_table(data, path, fmt))
    parsed.encoding = encoding
    return parsed


def _to_utf8(data: bytes, path: Path) -> tuple[bytes, str]:
    """The bytes as UTF-8 without a BOM, and the encoding they came in ("utf-8", "utf-16-le", ...)."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:], "utf-8"
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(codec).encode("utf-8"), codec
            except UnicodeError as exc:
                raise UsageError(f"{path.name} starts with a {name} byte-order mark but is not valid {name} "
                                 f"({exc.reason} at byte {len(bom) + exc.start + 1}); save the file as UTF-8") from None
    if _utf16_hint(data):  # NUL bytes are valid UTF-8: without this every line would parse as garbage
        raise UsageError(f"{path.name} is not UTF-8{_utf16_hint(data)}; save it as UTF-8, or as UTF-16 with a "
                         "byte-order mark")
    return data, "utf-8"


def _utf16_hint(data: bytes) -> str:
    """A hint for bytes that are not UTF-8 but look like UTF-16 without a BOM (every other byte NUL)."""
    sample = data[:4096]
    return (" (it looks like UTF-16 without a byte-order mark)"
            if len(sample) >= 4 and sample.count(0) >= len(sample) // 4 else "")


def sniff_delimiter(text: str) -> str:
    """The delimiter of CSV ``text``: :class:`csv.Sniffer`'s guess over the first :data:`SNIFF_BYTES`, kept only
    when it splits the header row into several columns, one of them ``prompt``; else the first of
    :data:`CSV_DELIMITERS` that does; else ``,`` (a one-column file, or a header without a ``prompt`` column,
    which the parser then reports)."""
    sample = text[:SNIFF_BYTES]
    header = next((line for line in sample.splitlines() if line.strip()), "")
    candidates = list(CSV_DELIMITERS)
    try:
        candidates.insert(0, csv.Sniffer().sniff(sample, delimiters="".join(CSV_DELIMITERS)).delimiter)
    except csv.Error:  # too little text, or no consistent delimiter
        pass
    for delimiter in candidates:
        try:
            cells = next(csv.reader([header], delimiter=delimiter), [])
        except csv.Error:
            continue
        if len(cells) > 1 and "prompt" in (_field_name(cell) for cell in cells):
            return delimiter
    return ","


def _lines(data: bytes):
    """(line number, bytes) for each line; a final line break does not start an empty line."""
    parts = _LINE_BREAK.split(data)
    if parts and parts[-1] == b"":
        parts.pop()
    return enumerate(parts, start=1)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte {exc.start + 1} of the line){_utf16_hint(raw)}") from None


def _parse_txt(data: bytes, path: Path) -> PromptFile:
    rows, invalid = [], []
    for line, raw in _lines(data):
        if not raw.strip():
            continue
        try:
            text = _decode(raw).strip()
            if text and not text.startswith("#"):
                _check_prompt(text)
        except ValueError as exc:
            invalid.append(InvalidRow(len(rows) + len(invalid), line, str(exc)))
            continue
        if not text or text.startswith("#"):
            continue
        rows.append(PromptRow(len(rows) + len(invalid), line, text))
    return PromptFile(path, "txt", rows, invalid)


def _parse_jsonl(data: bytes, path: Path) -> PromptFile:
    rows, invalid, ignored = [], [], set()
    for line, raw in _lines(data):
        if not raw.strip():
            continue
        row = len(rows) + len(invalid)
        try:
            try:
                record = json.loads(_decode(raw))
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object with a \"prompt\", got {type(record).__name__}")
            ignored.update(k for k in record if k != "prompt" and _field_name(k) not in SETTING_FIELDS)
            prompt = record.get("prompt")
            if not isinstance(prompt, str):
                raise ValueError("\"prompt\" is missing" if prompt is None else "\"prompt\" must be a string")
            settings = {_field_name(k): v for k, v in record.items() if _field_name(k) in SETTING_FIELDS}
            rows.append(PromptRow(row, line, _check_prompt(prompt), _check_settings(settings, from_text=False)))
        except ValueError as exc:
            invalid.append(InvalidRow(row, line, str(exc)))
    return PromptFile(path, "jsonl", rows, invalid, sorted(ignored))


def _parse_table(data: bytes, path: Path, fmt: str) -> PromptFile:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UsageError(f"{path.name} line {line}: not valid UTF-8{_utf16_hint(data)}; save the file as UTF-8 "
                         "(or UTF-16 with a byte-order mark)") from None
    if fmt == "tsv":
        delimiter = "\t"
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE, strict=True)
    else:
        delimiter = sniff_delimiter(text)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows, invalid = [], []
    header: list[str] | None = None
    prompt_column = -1
    ignored: list[str] = []
    last = 0
    try:
        for record in reader:
            line, last = last + 1, reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            if header is None:
                header = [_field_name(cell.strip()) for cell in record]
                if "prompt" not in header:
                    raise UsageError(
                        f"{path.name} has no 'prompt' column in its header (line {line}: "
                        f"{', '.join(cell.strip() for cell in record)}); name the prompt column 'prompt', "
                        "or use a .txt file with one prompt per line"
                    )
                prompt_column = header.index("prompt")
                ignored = [name for name in header if name != "prompt" and name not in SETTING_FIELDS]
                continue
            row = len(rows) + len(invalid)
            try:
                if len(record) != len(header):
                    raise ValueError(f"has {len(record)} fields, the header has {len(header)}")
                settings = {name: cell.strip() for i, (name, cell) in enumerate(zip(header, record))
                            if name in SETTING_FIELDS and i != prompt_column and cell.strip()}
                rows.append(PromptRow(row, line, _check_prompt(record[prompt_column]),
                                      _check_settings(settings, from_text=True)))
            except ValueError as exc:
                invalid.append(InvalidRow(row, line, str(exc)))
    except csv.Error as exc:
        raise UsageError(f"{path.name} line {reader.line_num}: {exc} (check the quoting)") from None
    if header is None:
        raise UsageError(f"{path.name} is empty: it needs a header row with a 'prompt' column")
    return PromptFile(path, fmt, rows, invalid, ignored, delimiter)


def _resolve_inputs(parsed: PromptFile) -> PromptFile:
    """Make each row's ``image`` and ``mask`` absolute (relative to the prompt file's folder); a row whose file
    is missing, or with a mask or strength but no image, becomes invalid."""
    folder = Path.cwd() if str(parsed.path) == STDIN_NAME else parsed.path.parent
    rows, invalid = [], list(parsed.invalid)
    for row in parsed.rows:
        settings = dict(row.settings)
        problem = None
        if "image" not in settings and ("mask" in settings or "strength" in settings):
            problem = f"{'mask' if 'mask' in settings else 'strength'} needs an image (the init image)"
        for name in ("image", "mask"):
            if problem is None and name in settings:
                resolved = (folder / settings[name]).absolute()
                if not resolved.is_file():
                    problem = f"{name} {settings[name]} does not exist (paths are relative to {folder})"
                settings[name] = str(resolved)
        if problem:
            invalid.append(InvalidRow(row.row, row.line, problem))
        else:
            rows.append(PromptRow(row.row, row.line, row.prompt, settings))
    invalid.sort(key=lambda bad: bad.row)
    return PromptFile(parsed.path, parsed.format, rows, invalid, parsed.ignored_fields, parsed.delimiter)


def _field_name(name: str) -> str:
    name = str(name).strip().lower().replace(" ", "_").replace("-", "_")
    return FIELD_ALIASES.get(name, name)


def _check_prompt(prompt: str) -> str:
    prompt = prompt.strip()
    if not prompt:
        raise ValueError("the prompt is empty")
    if problem := field_problem("prompt", prompt, label="the prompt"):  # length, control characters: the engine's rule
        raise ValueError(problem)
    return prompt


def _check_settings(settings: dict, *, from_text: bool) -> dict:
    """Convert and range-check per-row settings; raises ValueError naming the field and the bad value."""
    checked = {}
    for name, value in settings.items():
        if value is None:
            continue
        if name in ("image", "mask"):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a file path, got {value!r}")
            checked[name] = value.strip()
            continue
        if name == "negative_prompt":
            if not isinstance(value, str):
                raise ValueError(f"negative_prompt must be a string, got {value!r}")
            if problem := field_problem(name, value.strip(), label=name):
                raise ValueError(problem)
            if value.strip():
                checked[name] = value.strip()
            continue
        if name == "n":  # a row's own limit (the seed formula's row stride); the engine only needs n >= 1
            number = _to_int(name, value, from_text)
            if not 1 <= number <= MAX_IMAGES_PER_ROW:
                raise ValueError(f"n must be between 1 and {MAX_IMAGES_PER_ROW}, got {number}")
            checked[name] = number
            continue
        number = (_to_float if name in ("guidance", "strength") else _to_int)(name, value, from_text)
        # the engine's ranges and messages; a row's seed is image 0's, and -1 (random) is not a row seed
        if problem := field_problem(name, number, label=name, random_seed=False):
            raise ValueError(problem)
        checked[name] = number
    return checked


def _to_int(name: str, value, from_text: bool) -> int:
    if from_text and isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    if not from_text and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be a whole number, got {value!r}")


def _to_float(name: str, value, from_text: bool) -> float:
    if from_text and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif not from_text and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{name} must be a number, got {value!r}")
