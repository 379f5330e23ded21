import numpy as np
import pytest

from jaxdp import data


def test_shared_tokenizer_encodes_hello_world(tokenizer_dir):
    tok = data.load_tokenizer(tokenizer_dir)
    assert data.tokenize(tok, "Hello world").tolist() == [15496, 995]
    assert data.tokenize(tok, " The quick brown fox").tolist() == [383, 2068, 7586, 21831]
    assert tok.eos_token_id == 50256


def test_blocks_are_contiguous_and_drop_the_tail():
    ids = np.arange(23, dtype=np.int32)
    blocks = data.to_blocks(ids, 7)
    assert blocks.shape == (3, 7)
    np.testing.assert_array_equal(blocks.reshape(-1), ids[:21])
    with pytest.raises(ValueError, match="block_size"):
        data.to_blocks(ids, 1)


def test_text_files_concatenate_in_order(tmp_path, tokenizer_dir):
    tok = data.load_tokenizer(tokenizer_dir)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Hello world. ")
    b.write_text("The quick brown fox jumps over the lazy dog.")
    expected = np.concatenate(
        [data.tokenize(tok, a.read_text()), data.tokenize(tok, b.read_text())]
    )
    blocks = data.text_file_blocks([a, b], tok, block_size=4)
    np.testing.assert_array_equal(blocks.reshape(-1), expected[: blocks.size])
    assert blocks.size == len(expected) // 4 * 4
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.text_file_blocks([tmp_path / "missing.txt"], tok, 4)
