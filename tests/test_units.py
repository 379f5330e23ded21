"""Privacy units of records and users: reading records, their rows, per-unit clipping (both
engines) against a loop over units, and the sensitivity of adding or removing a whole unit."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import SAFE, dp_plan, load_config, small

from jaxdp import clipping, data, sampling, steps
from jaxdp import run as run_lib
from jaxdp.config import to_settings
from jaxdp.gpt2 import init_model
from jaxdp.loss import model_example_loss

# ---- Reading records ---------------------------------------------------------------------


def test_records_from_lines_paragraphs_jsonl_and_csv(tmp_path, tokenizer_dir):
    tok = data.load_tokenizer(tokenizer_dir)
    text = tmp_path / "notes.txt"
    text.write_text("First note, one line.\n \nSecond note\nover two lines.\n\nThird.\n")
    lines = data.TextSource("text_files", files=(text,), record_separator="line")
    assert [t for b in lines.records() for t, _ in b] == [
        "First note, one line.",
        "Second note",
        "over two lines.",
        "Third.",
    ]
    paragraphs = data.TextSource("text_files", files=(text,), record_separator="paragraph")
    assert [t for b in paragraphs.records() for t, _ in b] == [
        "First note, one line.",
        "Second note\nover two lines.",
        "Third.",
    ]
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"text": t, "user_id": u}) for t, u in [("a b", "x"), ("c", 7)])
    )
    source = data.TextSource("jsonl", files=(jsonl,), user_field="user_id")
    assert [r for b in source.records() for r in b] == [("a b", "x"), ("c", 7)]
    table = tmp_path / "r.csv"
    table.write_text('text,user_id\n"hello, world",u1\nbye,u2\n')
    source = data.TextSource("csv", files=(table,), user_field="user_id")
    assert [r for b in source.records() for r in b] == [("hello, world", "u1"), ("bye", "u2")]
    records = data.load_records(source, tok)
    assert records.num_records == 2 and records.users.tolist() == [0, 1]
    first = records.tokens[records.offsets[0] : records.offsets[1]].tolist()
    assert first == data.tokenize(tok, "hello, world").tolist() + [tok.eos_token_id]
    with pytest.raises(ValueError, match="no field 'user'"):
        list(data.TextSource("csv", files=(table,), user_field="user").records())


def _records(lengths, users=None, seed=0, vocab=61):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=sum(lengths)).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return data.Records(tokens, offsets, None if users is None else np.asarray(users, np.int64))


def test_record_rows_truncate_pad_split_and_cap():
    records = _records([3, 1, 17, 7, 9], users=[0, 1, 0, 2, 2])
    T = 7
    one = data.record_rows(records, T, unit="record")
    assert one.num_units == 4  # the one-token record predicts nothing: left out
    assert one.counts.tolist() == [1, 1, 1, 1] and one.lengths.tolist() == [3, 7, 7, 7]
    np.testing.assert_array_equal(one.tokens[0, :3], records.tokens[:3])
    assert one.token_mask(np.array([0]))[0].tolist() == [True] * 3 + [False] * 4 and one.padded
    split = data.record_rows(records, T, unit="record", max_blocks_per_unit=3)
    # 17 tokens -> 7 + 7 + 3; 9 tokens -> 7 + 2.
    assert split.counts.tolist() == [1, 3, 1, 2]
    assert split.lengths.tolist() == [3, 7, 7, 3, 7, 7, 2]
    np.testing.assert_array_equal(split.tokens[1], records.tokens[4:11])
    users = data.record_rows(records, T, unit="user", max_blocks_per_unit=3)
    # user 0: record 0 (1 row) + record 2 (3 rows) capped at 3; user 2: records 3 and 4.
    assert users.num_units == 2 and users.counts.tolist() == [3, 3]
    assert users.lengths.tolist() == [3, 7, 7, 7, 7, 2]
    np.testing.assert_array_equal(users.rows_of(np.array([1])), [3, 4, 5])
    assert users.unit_of_row.tolist() == [0, 0, 0, 1, 1, 1]
    assert "user" in users.describe() and "up to 3 blocks" in users.describe()
    with pytest.raises(ValueError, match="user column"):
        data.record_rows(_records([5, 5]), T, unit="user")


# ---- Per-unit clipped sums: both engines against a loop over units -------------------------


def _setup(tiny_config, unit, max_blocks, seed=0):
    lengths = [9, 3, 15, 7, 2, 5, 11]
    users = [0, 1, 0, 2, 3, 1, 4]
    rows = data.record_rows(
        _records(lengths, users, seed), 7, unit=unit, max_blocks_per_unit=max_blocks
    )
    model = init_model(tiny_config, seed=seed)
    graphdef, state = steps.init_state(model, optax.sgd(0.1))
    return rows, graphdef, state.params


def _loop_over_units(graphdef, params, rows, units, C):
    """The reference: for each drawn unit, sum its rows' gradients (plain jax.grad of one row),
    clip the sum to C in NumPy, and add the clipped sums."""
    grad = jax.jit(jax.grad(model_example_loss(graphdef)), static_argnums=2)
    total = None
    for u in units:
        unit_grad = None
        for r in rows.rows_of(np.array([u])):
            example = {"tokens": jnp.asarray(rows.tokens[r], jnp.int32),
                       "token_mask": jnp.asarray(rows.token_mask(np.array([r]))[0])}  # fmt: skip
            g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grad(params, example, None))]
            unit_grad = (
                g if unit_grad is None else [a + b for a, b in zip(unit_grad, g, strict=True)]
            )
        norm = np.sqrt(sum(np.sum(x**2) for x in unit_grad))
        clipped = [x * min(1.0, C * SAFE / norm) for x in unit_grad]
        total = clipped if total is None else [a + b for a, b in zip(total, clipped, strict=True)]
    return total


def _engine_sum(graphdef, params, rows, units, C, engine, clipping="flat"):
    plan = dp_plan(C, 0.0, 4, clipping=clipping)
    grad_step = jax.jit(steps.make_grad_step(plan, engine, graphdef=graphdef))
    drawn = rows.rows_of(np.asarray(units))
    batches, dropped = sampling.pack_units(drawn, rows.unit_of_row[drawn], 8, 4)
    assert dropped == 0
    acc = steps.zero_accum(params)
    for b in batches:
        batch = {
            "tokens": jnp.asarray(rows.tokens[b.rows], jnp.int32),
            "token_mask": jnp.asarray(rows.token_mask(b.rows)),
            "is_padding": jnp.asarray(b.is_padding),
            "segment_ids": jnp.asarray(b.segment_ids),
        }
        acc = grad_step(params, batch, None, acc)
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(acc.grad_sum)], acc.stats


@pytest.mark.parametrize("unit", ["record", "user"])
def test_unit_clipped_sum_equals_a_loop_over_units(tiny_config, unit):
    engine = steps.Engine("vmap", microbatch_size=4)
    rows, graphdef, params = _setup(tiny_config, unit, max_blocks=3)
    assert rows.max_rows_per_unit > 1 and rows.padded  # split and padded units are exercised
    units = [0, 1, 3, 4] if unit == "record" else [0, 2, 3]
    expected = _loop_over_units(graphdef, params, rows, units, C=1.0)
    C = float(np.sqrt(sum(np.sum(x**2) for x in expected)) / len(units))  # some units clipped
    expected = _loop_over_units(graphdef, params, rows, units, C)
    got, stats = _engine_sum(graphdef, params, rows, units, C, engine)
    for a, b in zip(got, expected, strict=True):
        assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(b), 1e-12)
    assert float(stats.num_examples) == len(rows.rows_of(np.asarray(units)))
    assert float(stats.num_clipped) > 0


# ---- Sensitivity: add or remove a whole unit, every draw of the others ---------------------


def _clipped_sum_of_units(rows, drawn_units, grad_of, C):
    drawn = rows.rows_of(np.asarray(drawn_units, np.int64))
    if not len(drawn):
        return np.zeros(4)
    total = np.zeros(4)
    batches, dropped = sampling.pack_units(drawn, rows.unit_of_row[drawn], 8, 8)
    assert dropped == 0
    for b in batches:
        grads = np.stack([grad_of(rows.tokens[r], rows.lengths[r]) for r in b.rows])
        out, _ = clipping.clip_and_sum(
            {"w": jnp.asarray(grads)},
            C,
            jnp.asarray(b.is_padding),
            segment_ids=jnp.asarray(b.segment_ids),
        )
        total += np.asarray(out["w"], np.float64)
    return total


@pytest.mark.parametrize("unit", ["record", "user"])
def test_removing_or_adding_a_whole_unit_moves_the_sum_by_at_most_C(unit):
    """A toy dataset of three users (and their records): every neighbour that lacks one whole
    unit, under every draw of the other units. Positions of the others shift; the bound holds
    and the output is unchanged when the missing unit is not drawn."""
    C = 1.0
    table = {}

    def grad_of(tokens, length):  # a row's gradient: a function of its content alone
        key = (tuple(int(t) for t in tokens[:length]),)
        if key not in table:
            table[key] = np.random.default_rng(len(table)).normal(size=4) * 2
        return table[key]

    lengths, users = [9, 3, 15, 7, 5, 11], [0, 1, 0, 2, 1, 2]
    records = _records(lengths, users, seed=3)
    full = data.record_rows(records, 7, unit=unit, max_blocks_per_unit=3)
    worst, untouched = 0.0, 0.0
    for removed in range(full.num_units):
        owner = np.arange(len(lengths)) if unit == "record" else np.asarray(users)
        keep = [r for r in range(len(lengths)) if (owner[r] != removed)]
        kept_lengths = [lengths[r] for r in keep]
        kept_tokens = np.concatenate(
            [records.tokens[records.offsets[r] : records.offsets[r + 1]] for r in keep]
        )
        offsets = np.concatenate([[0], np.cumsum(kept_lengths)]).astype(np.int64)
        kept_users = np.asarray([users[r] for r in keep], np.int64)
        smaller = data.record_rows(
            data.Records(kept_tokens, offsets, kept_users), 7, unit=unit, max_blocks_per_unit=3
        )
        assert smaller.num_units == full.num_units - 1
        others = [u for u in range(full.num_units) if u != removed]
        for r in range(len(others) + 1):
            for subset in itertools.combinations(others, r):
                in_smaller = [u if u < removed else u - 1 for u in subset]
                without = _clipped_sum_of_units(smaller, in_smaller, grad_of, C)
                same = _clipped_sum_of_units(full, list(subset), grad_of, C)
                untouched = max(untouched, np.linalg.norm(same - without))
                with_unit = _clipped_sum_of_units(full, sorted([*subset, removed]), grad_of, C)
                worst = max(worst, np.linalg.norm(with_unit - without))
    assert worst <= C * (1 + 1e-5)
    assert worst > 0.99 * C  # attained: a whole unit's clipped sum
    assert untouched < 1e-5


# ---- End to end ----------------------------------------------------------------------------


def _support_tickets(path, n_users=12, seed=0):
    rng = np.random.default_rng(seed)
    words = "the order arrived late please refund my account password reset thanks help".split()
    with open(path, "w") as f:
        for i in range(120):
            text = " ".join(rng.choice(words, size=rng.integers(3, 40)))
            f.write(json.dumps({"text": text, "user_id": f"u{i % n_users}"}) + "\n")


@pytest.mark.parametrize("unit, engine", [("record", "vmap"), ("user", "vmap")])
def test_a_run_with_record_or_user_units_states_epsilon_per_unit(tmp_path, unit, engine):
    _support_tickets(tmp_path / "train.jsonl")
    cfg = small(load_config("tiny_offline"))
    cfg.data.source, cfg.data.privacy_unit = "jsonl", unit
    cfg.data.train_files, cfg.data.eval_files = (str(tmp_path / "train.jsonl"),), ()
    cfg.data.max_blocks_per_unit = 3
    cfg.dp.engine, cfg.dp.expected_batch_size = engine, 4
    summary = run_lib.run(to_settings(cfg), tmp_path / "run")
    assert summary["epsilon_per"] == unit and unit in summary["privacy_unit"]
    assert summary["num_examples"] == (120 if unit == "record" else 12)
    assert summary["sampling_prob"] == 4 / summary["num_examples"]
    assert "group_privacy" not in summary
    card = (tmp_path / "run" / "hf" / "README.md").read_text()
    assert f"per {unit}**" in card and f"{summary['epsilon']:.4g}" in card


def test_dataset_split_with_text_and_user_columns(tmp_path, tokenizer_dir):
    """A `datasets` split (here a local JSON dataset) with text and user columns."""
    tok = data.load_tokenizer(tokenizer_dir)
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    rows = [{"text": f"note {i} " * (i + 1), "user_id": f"p{i % 3}"} for i in range(7)]
    (ds_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = data.TextSource("hf", dataset=str(ds_dir), split="train", user_field="user_id")
    records = data.load_records(source, tok)
    assert records.num_records == 7 and records.users.tolist() == [0, 1, 2, 0, 1, 2, 0]
    users = data.record_rows(records, 8, unit="user", max_blocks_per_unit=2)
    assert users.num_units == 3 and users.max_rows_per_unit == 2


@pytest.mark.parametrize("engine", ["ghost", "fused"])
def test_engines_that_norm_one_row_refuse_units_of_several_rows(tiny_config, engine):
    """The ghost engine would norm a unit from pair products (another computation than the sum
    it contributes), the fused engine cannot sum rows before a layer's clipping: both refuse,
    in the config check and in the engine itself."""
    cfg = small(load_config("tiny_offline"))
    cfg.data.privacy_unit, cfg.data.max_blocks_per_unit = "user", 3
    cfg.data.source = "jsonl"  # (user units need a user column: the engine is the only fault)
    cfg.dp.engine, cfg.dp.clipping = engine, "per_layer" if engine == "fused" else "flat"
    with pytest.raises(run_lib.ConfigError, match="clips one row per privacy unit"):
        to_settings(cfg)
    rows, graphdef, params = _setup(tiny_config, "user", max_blocks=3)
    with pytest.raises(NotImplementedError, match="one row per unit"):
        _engine_sum(
            graphdef,
            params,
            rows,
            [0, 2],
            1.0,
            steps.Engine(engine, microbatch_size=4),
            clipping=cfg.dp.clipping,
        )


def test_users_are_told_apart_by_the_exact_json_value_and_type(tmp_path, tokenizer_dir):
    """JSON 1 and "1" are two users, the same id twice is one; ids that compare equal in Python
    but are not the same JSON value (1, 1.0, true) are refused rather than merged or split, and
    so are null and NaN."""
    tok = data.load_tokenizer(tokenizer_dir)

    def load(ids, name):
        path = tmp_path / f"{name}.jsonl"
        lines = [
            json.dumps({"text": f"record number {i}", "user_id": u}) for i, u in enumerate(ids)
        ]
        path.write_text("\n".join(lines) + "\n")
        source = data.TextSource("jsonl", files=(path,), user_field="user_id")
        return data.load_records(source, tok, cache_dir=tmp_path / "cache")

    records = load([1, "1", "a", 1, 2.5, "true", False, 3.0], "ok")
    assert records.users.tolist() == [0, 1, 2, 0, 3, 4, 5, 6]
    rows = data.record_rows(records, 8, unit="user", max_blocks_per_unit=2)
    assert rows.num_units == 7
    for ambiguous in ([1, 1.0], [1, True], [0, False], [2.0, 2]):
        with pytest.raises(ValueError, match="compare equal"):
            load([*ambiguous, "x"], "ambiguous")
    assert data.user_key(np.int64(1)) == data.user_key(1) != data.user_key(np.float64(1.0))
    with pytest.raises(ValueError, match="is null"):
        load([None], "null")
    path = tmp_path / "nan.jsonl"  # json.dumps writes NaN for a float column's missing value
    path.write_text('{"text": "a", "user_id": NaN}\n{"text": "b", "user_id": NaN}\n')
    with pytest.raises(ValueError, match="NaN"):
        data.load_records(data.TextSource("jsonl", files=(path,), user_field="user_id"), tok)


@pytest.mark.parametrize("unit", ["block", "record", "user"])
def test_the_unit_is_described_from_the_settings_not_from_the_data(unit):
    """The longest unit present (a statistic of the data) never reaches the description."""
    short = _records([5] * 6, users=[0, 1, 2, 3, 4, 5])
    long = _records([5] * 6 + [40], users=[0, 1, 2, 3, 4, 5, 6])
    if unit == "block":
        rows = [data.block_rows(r.tokens, 4) for r in (short, long)]
    else:
        rows = [data.record_rows(r, 8, unit=unit, max_blocks_per_unit=3) for r in (short, long)]
        assert rows[0].max_rows_per_unit == 1 and rows[1].max_rows_per_unit == 3
    assert rows[0].describe() == rows[1].describe()
    assert rows[0].padded == rows[1].padded and rows[0].several_rows == rows[1].several_rows
    if unit != "block":
        assert "up to 3 blocks of 8 tokens" in rows[0].describe()
        assert data.describe_unit(unit, 8, 1).endswith("its first 8 tokens")
