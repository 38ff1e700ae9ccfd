"""dalle batch without a model: prompt files, seeds, shards, grouping, manifest."""

from __future__ import annotations

import json
import threading

import pytest

from conftest import DATA
from dallecli.batch.manifest import append_record, finished_images, read_records, start_run
from dallecli.batch.plan import (BatchOptions, Shard, group_batches, image_seed, parse_shard, plan_jobs,
                                 shard_from_env, split_finished, validate_options)
from dallecli.batch.prompts import parse_prompts, read_prompt_file
from dallecli.errors import UsageError

DEFAULTS = {"steps": 20, "guidance": 7.5, "width": 512, "height": 512}


def prompts_of(parsed):
    return [row.prompt for row in parsed.rows]


# -- .txt ------------------------------------------------------------------------------------------------
def test_c09_bom_crlf_comments_quotes_no_final_newline():
    parsed = read_prompt_file(DATA / "cases" / "prompts-bom-crlf.txt")
    assert prompts_of(parsed) == ["a cat", "a dog's \"red\" hat"]
    assert [row.line for row in parsed.rows] == [1, 4]
    assert [row.row for row in parsed.rows] == [0, 1]
    assert parsed.invalid == []


def test_txt_line_ends_and_whitespace():
    data = b"  one  \r\n\r\n   # indented comment\rtwo\n\t\nthree\n"
    parsed = parse_prompts(data, "txt")
    assert prompts_of(parsed) == ["one", "two", "three"]
    assert [row.line for row in parsed.rows] == [1, 4, 6]


def test_txt_bad_utf8_line_is_reported_with_its_line():
    parsed = parse_prompts(b"good\nbad \xff byte\nalso good\n", "txt")
    assert prompts_of(parsed) == ["good", "also good"]
    assert [(bad.row, bad.line) for bad in parsed.invalid] == [(1, 2)]
    assert "UTF-8" in str(parsed.invalid[0]) and str(parsed.invalid[0]).startswith("line 2:")
    assert [row.row for row in parsed.rows] == [0, 2]  # row numbers do not move when a row is malformed


# -- .csv / .tsv -------------------------------------------------------------------------------------------
def test_csv_prompt_column_quoting_and_settings():
    data = ("\ufeffid,Prompt,seed,steps,guidance,width,height,n,negative_prompt\r\n"
            '1,"a cat, sitting",7,3,2.5,64,48,2,blurry\r\n'
            "\r\n"
            '2,"a ""quoted"" dog",,,,,,,\r\n'
            '3,"two\nlines",,,,,,,\r\n'
            "4,a bird,,,,,,,\r\n").encode()
    parsed = parse_prompts(data, "csv")
    assert prompts_of(parsed) == ["a cat, sitting", 'a "quoted" dog', "two\nlines", "a bird"]
    assert parsed.rows[0].settings == {"seed": 7, "steps": 3, "guidance": 2.5, "width": 64, "height": 48, "n": 2,
                                       "negative_prompt": "blurry"}
    assert parsed.rows[1].settings == {}
    assert [row.line for row in parsed.rows] == [2, 4, 5, 7]
    assert parsed.ignored_fields == ["id"]


def test_csv_malformed_rows_have_line_numbers():
    data = ("prompt,width,seed,guidance\n"
            "fine,64,1,7\n"
            "odd width,100,,\n"
            "bad seed,,x,\n"
            ",64,,\n"
            "too,many,fields,here,!\n"
            "negative guidance,,,-1\n").encode()
    parsed = parse_prompts(data, "csv")
    assert prompts_of(parsed) == ["fine"]
    messages = {bad.line: bad.message for bad in parsed.invalid}
    assert set(messages) == {3, 4, 5, 6, 7}
    assert "not a multiple of 8" in messages[3] and "96 and 104" in messages[3]
    assert "seed" in messages[4] and "'x'" in messages[4]
    assert "empty" in messages[5]
    assert "5 fields" in messages[6]
    assert "guidance" in messages[7]


def test_row_ranges_are_the_engines():
    """A row is range-checked by the engine's own field check; only its label and the row's n limit differ."""
    from dallecli.engine.request import MAX_SEED, MAX_STEPS, field_problem

    data = f"prompt,steps,guidance,seed,height\na,{MAX_STEPS + 1},,,\nb,,101,,\nc,,,{MAX_SEED + 1},\nd,,,,8200\n"
    messages = [bad.message for bad in parse_prompts(data.encode(), "csv").invalid]
    assert messages == [field_problem("steps", MAX_STEPS + 1, label="steps"),
                        field_problem("guidance", 101.0, label="guidance"),
                        field_problem("seed", MAX_SEED + 1, label="seed", random_seed=False),
                        field_problem("height", 8200, label="height")]
    assert messages[0] == field_problem("steps", MAX_STEPS + 1).replace("--steps", "steps")
    assert "random" not in messages[2] and "-1 for a random seed" in field_problem("seed", MAX_SEED + 1)
    assert [bad.message for bad in parse_prompts(b"prompt,seed\na,-1\n", "csv").invalid] == [
        f"seed must be between 0 and {MAX_SEED} (got -1)"]


def test_csv_without_prompt_column_is_a_usage_error():
    with pytest.raises(UsageError, match="no 'prompt' column"):
        parse_prompts(b"text,seed\na cat,1\n", "csv")


def test_partiprompts_tsv_as_is():
    parsed = read_prompt_file(DATA / "PartiPrompts.tsv")
    assert len(parsed.rows) == 1632 and parsed.invalid == []
    assert parsed.rows[0].prompt == "bond" and parsed.rows[0].line == 2
    assert parsed.ignored_fields == ["category", "challenge", "note"]
    # a TSV field is never quoted: a prompt that starts with a quote keeps it
    assert any(row.prompt.startswith('"G I G G L E" painted') for row in parsed.rows)


def test_tsv_settings_columns():
    parsed = parse_prompts(b"Prompt\tsteps\na cat\t5\na dog\t\n", "tsv")
    assert [(row.prompt, row.settings) for row in parsed.rows] == [("a cat", {"steps": 5}), ("a dog", {})]


# -- .jsonl ------------------------------------------------------------------------------------------------
def test_jsonl_settings_and_malformed_lines():
    lines = [
        '{"prompt": "a cat", "seed": 3, "n": 2, "steps": 4, "guidance": 1, "width": 64, "height": 32, '
        '"negative_prompt": "blur", "category": "animals"}',
        "",
        '{"prompt": "a dog", "num_images": 3, "guidance_scale": 0, "seed": null}',
        '{"prompt": "broken"',
        '["a list"]',
        '{"negative_prompt": "no prompt"}',
        '{"prompt": "seed as bool", "seed": true}',
        '{"prompt": "seed as text", "seed": "7"}',
        '{"prompt": "   "}',
        '{"prompt": "too many", "n": 5000}',
    ]
    parsed = parse_prompts("\n".join(lines).encode(), "jsonl")
    assert prompts_of(parsed) == ["a cat", "a dog"]
    assert parsed.rows[0].settings == {"seed": 3, "n": 2, "steps": 4, "guidance": 1.0, "width": 64, "height": 32,
                                       "negative_prompt": "blur"}
    assert parsed.rows[1].settings == {"n": 3, "guidance": 0.0}
    assert [bad.line for bad in parsed.invalid] == [4, 5, 6, 7, 8, 9, 10]
    assert "not valid JSON" in parsed.invalid[0].message
    assert "prompt" in parsed.invalid[2].message
    assert parsed.ignored_fields == ["category"]


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "p.md").write_text("a cat")
    with pytest.raises(UsageError, match="unknown prompt file type"):
        read_prompt_file(tmp_path / "p.md")
    with pytest.raises(UsageError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")


# -- seeds, shards, jobs, grouping -------------------------------------------------------------------------
def test_seed_formula():
    assert image_seed(42, 0, 0) == 42
    assert image_seed(42, 3, 2) == 3044
    assert image_seed(2**32 - 1, 0, 1) == 0
    assert image_seed(42, 3, 2, row_seed=9) == 11


def test_plan_overrides_and_seeds_do_not_depend_on_shard_or_batch_size():
    parsed = parse_prompts(b'{"prompt": "a"}\n{"prompt": "b", "n": 3, "steps": 5}\n{"prompt": "c", "seed": 100}\n'
                           b'{"prompt": "d", "width": 64}\n', "jsonl")
    options = BatchOptions(n=2, steps=2, width=32, height=32, batch_size=2)
    jobs = plan_jobs(parsed.rows, options, DEFAULTS, "m", base_seed=7)
    assert [(j.row, j.image, j.seed) for j in jobs] == [
        (0, 0, 7), (0, 1, 8), (1, 0, 1007), (1, 1, 1008), (1, 2, 1009), (2, 0, 100), (2, 1, 101), (3, 0, 3007),
        (3, 1, 3008)]
    assert jobs[2].settings.steps == 5 and jobs[0].settings.steps == 2
    assert jobs[0].settings.guidance_scale == 7.5  # the model's default
    assert jobs[7].settings.width == 64
    sharded = [j for i in range(3) for j in plan_jobs(parsed.rows, options, DEFAULTS, "m", 7, Shard(i, 3))]
    assert sorted(j.key() for j in sharded) == sorted(j.key() for j in jobs)
    assert {j.row for j in plan_jobs(parsed.rows, options, DEFAULTS, "m", 7, Shard(1, 3))} == {1}
    for size in (1, 2, 5):
        assert sorted(j.seed for b in group_batches(jobs, size) for j in b) == sorted(j.seed for j in jobs)


def test_c08_last_partial_batch_and_grouping():
    parsed = parse_prompts(b"one\ntwo\nthree\n", "txt")
    jobs = plan_jobs(parsed.rows, BatchOptions(n=2), DEFAULTS, "m", base_seed=0)
    assert [len(b) for b in group_batches(jobs, 2)] == [2, 2, 2]
    assert [len(b) for b in group_batches(jobs[:5], 2)] == [2, 2, 1]
    mixed = parse_prompts(b'{"prompt": "a"}\n{"prompt": "b", "steps": 3}\n{"prompt": "c"}\n{"prompt": "d", "steps": 3}\n'
                          b'{"prompt": "e"}\n', "jsonl")
    batches = group_batches(plan_jobs(mixed.rows, BatchOptions(), DEFAULTS, "m", 0), 2)
    assert [[j.prompt for j in b] for b in batches] == [["a", "c"], ["e"], ["b", "d"]]
    assert all(len({j.settings for j in b}) == 1 for b in batches)


def test_shard_parsing_and_environment():
    assert parse_shard("1/4") == Shard(1, 4)
    for bad in ("4/4", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(UsageError):
            parse_shard(bad)
    assert shard_from_env({}) is None
    assert shard_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert shard_from_env({"WORLD_SIZE": "4", "RANK": "3"}) == Shard(3, 4)
    with pytest.raises(UsageError, match="--shard"):
        shard_from_env({"WORLD_SIZE": "4", "RANK": "9"})


def test_options_are_validated_before_loading():
    validate_options(BatchOptions(n=2, width=32, height=32))
    with pytest.raises(UsageError, match="424 and 432"):
        validate_options(BatchOptions(height=427))
    with pytest.raises(UsageError, match="batch-size"):
        validate_options(BatchOptions(batch_size=0))
    with pytest.raises(UsageError, match="at most 1000"):
        validate_options(BatchOptions(n=1001))


# -- manifest ----------------------------------------------------------------------------------------------
def test_start_run_first_writer_wins(tmp_path):
    folder = tmp_path / "out"
    results = []
    threads = [threading.Thread(target=lambda s=s: results.append(start_run(folder, s))) for s in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1
    assert start_run(folder, 999) == results[0]
    records = read_records(folder)
    assert [r["type"] for r in records] == ["run"] and records[0]["base_seed"] == results[0]
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp")]


def test_finished_images_needs_the_file_and_a_done_latest_record(tmp_path):
    parsed = parse_prompts(b"a\nb\nc\n", "txt")
    jobs = plan_jobs(parsed.rows, BatchOptions(), DEFAULTS, "m", 0)
    start_run(tmp_path, 0)
    for job in jobs:
        (tmp_path / f"{job.row}.png").write_bytes(b"png")
        append_record(tmp_path, {"type": "image", "status": "done", **job.fields(), "path": f"{job.row}.png"})
    (tmp_path / "1.png").unlink()
    append_record(tmp_path, {"type": "image", "status": "failed", **jobs[2].fields(), "error": "x"})
    with open(tmp_path / "manifest.jsonl", "ab") as handle:
        handle.write(b'{"type": "image", "status": "do')  # a torn line is ignored
    finished = finished_images(tmp_path, read_records(tmp_path))
    pending, done = split_finished(jobs, finished)
    assert [j.row for j in done] == [0] and [j.row for j in pending] == [1, 2]
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines[:-1])


def test_dry_run_counts_prompts_and_images_without_loading_a_model(tmp_path):
    """#19 item 11: `dalle batch --dry-run` checks the file and counts; no model is resolved or loaded."""
    import json

    from typer.testing import CliRunner

    from dallecli.cli.app import app

    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "n": 3}\n{"prompt": "a dog"}\n{"prompt": "a hat"}\n')
    args = ["batch", str(tmp_path / "p.jsonl"), "-n", "2", "--model", "org/not-downloaded", "--dry-run"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == "3 prompt(s), 7 image(s)"
    sharded = CliRunner().invoke(app, [*args, "--shard", "1/2", "--json"])
    assert json.loads(sharded.stdout) == {"prompts": 1, "images": 2, "malformed": 0, "shard": "1/2"}
    assert not (tmp_path / "dalle-out").exists() and not list(tmp_path.glob("*/manifest.jsonl"))


# -- #19 item 11: encodings, sniffed delimiters, --input-format ----------------------------------------------
@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_utf8_bom_and_utf16_utf32_with_a_bom_are_read(encoding):
    def encode(text):  # with exactly one BOM ("utf-16-le"/"-be" write none, the others do)
        return ("\ufeff" + text).encode(encoding) if encoding in ("utf-16-le", "utf-16-be") else text.encode(encoding)

    parsed = parse_prompts(encode("prompt,seed\n\"a café, at night\",7\nun chat\u00e9,\n"), "csv")
    assert prompts_of(parsed) == ["a café, at night", "un chat\u00e9"]
    assert parsed.rows[0].settings == {"seed": 7} and [row.line for row in parsed.rows] == [2, 3]
    assert parsed.encoding == {"utf-8-sig": "utf-8", "utf-16": "utf-16-le", "utf-32": "utf-32-le"}.get(encoding, encoding)
    txt = parse_prompts(encode("one\r\n# two\r\nthree\r\n"), "txt")
    assert prompts_of(txt) == ["one", "three"]


def test_utf16_without_a_bom_is_named_in_the_error():
    for fmt in ("csv", "txt", "jsonl"):
        with pytest.raises(UsageError, match=r"^p\.csv is not UTF-8 \(it looks like UTF-16 without a byte-order "
                                             r"mark\); save it as UTF-8, or as UTF-16 with a byte-order mark$"):
            parse_prompts("prompt\na cat\n".encode("utf-16-le"), fmt, "p.csv")
    with pytest.raises(UsageError, match="starts with a UTF-16 byte-order mark but is not valid UTF-16"):
        parse_prompts(b"\xff\xfep\x00r\x00\x00\xdc", "txt", "p.txt")  # a lone low surrogate


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_csv_delimiter_is_sniffed(delimiter):
    data = delimiter.join(["id", "prompt", "seed"]) + "\n"
    data += delimiter.join(["1", '"a cat, a dog; a bird"', "4"]) + "\n" + delimiter.join(["2", "a fox", ""]) + "\n"
    parsed = parse_prompts(data.encode(), "csv")
    assert parsed.delimiter == delimiter and parsed.invalid == []
    assert prompts_of(parsed) == ["a cat, a dog; a bird", "a fox"] and parsed.rows[0].settings == {"seed": 4}


def test_csv_sniffing_falls_back_to_a_comma():
    from dallecli.batch.prompts import sniff_delimiter

    # one column: nothing to sniff; a comma inside an unquoted prompt is still a malformed row, as before
    parsed = parse_prompts(b"prompt\na red circle\na cat; a dog\n", "csv")
    assert parsed.delimiter == "," and prompts_of(parsed) == ["a red circle", "a cat; a dog"]
    # the sniffer's guess is kept only when it finds a 'prompt' column
    assert sniff_delimiter("prompt;seed\na b|c;1\n") == ";" and sniff_delimiter("") == ","
    assert sniff_delimiter("title;text\nx;y\n") == ","  # no prompt column: the parser reports it
    with pytest.raises(UsageError, match="no 'prompt' column"):
        parse_prompts(b"title;text\nx;y\n", "csv")


def test_input_format_for_a_file_without_a_suffix(tmp_path):
    (tmp_path / "prompts").write_text('{"prompt": "a cat", "n": 2}\n')
    with pytest.raises(UsageError, match=r"unknown prompt file type ''; .*--input-format txt\|csv\|tsv\|jsonl"):
        read_prompt_file(tmp_path / "prompts")
    parsed = read_prompt_file(tmp_path / "prompts", "JSONL")
    assert parsed.format == "jsonl" and parsed.rows[0].settings == {"n": 2}
    assert prompts_of(read_prompt_file(tmp_path / "prompts", "txt")) == ['{"prompt": "a cat", "n": 2}']
    with pytest.raises(UsageError, match="--input-format 'yaml' is not a prompt format; use one of txt, csv"):
        read_prompt_file(tmp_path / "prompts", "yaml")


def test_stdin_rows_take_image_paths_from_the_working_folder(tmp_path):
    from PIL import Image

    from dallecli.batch.prompts import STDIN_NAME

    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")  # conftest runs every test in tmp_path
    parsed = parse_prompts(b'{"prompt": "a cat", "image": "in.png"}\n{"prompt": "x", "image": "no.png"}\n',
                           "jsonl", STDIN_NAME)
    assert parsed.rows[0].settings["image"] == str(tmp_path / "in.png")
    assert str(parsed.invalid[0]) == f"line 2: image no.png does not exist (paths are relative to {tmp_path})"
