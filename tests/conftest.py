import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer():
    from bitnet_rl.models.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A saved tiny BitNetForCausalLM (BF16-master-weight layout, float32 here) with its tokenizer."""
    from bitnet_rl.models.tiny import tiny_bitnet

    out = tmp_path_factory.mktemp("tiny_bitnet")
    tiny_bitnet(out, tokenizer=tokenizer, seed=0)
    return out


@pytest.fixture
def no_compile():
    """transformers decorates its bitnet quantizers with torch.compile: eager is the same math, 20 s faster on CPU."""
    torch.compiler.set_stance("force_eager")
    yield
    torch.compiler.set_stance("default")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
