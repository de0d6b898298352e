"""Beam search in the engine: the same beams as transformers, with prompt and prefix blocks shared."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import MAX_STEPS, greedy_params, random_prompts, run_to_completion

from molten.engine.sampling_params import SamplingParams, SamplingParamsError

NEW_TOKENS = 8
BEAM_WIDTH = 3


def reference_beam_search(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            num_beams=BEAM_WIDTH,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return output[0, len(prompt) :].tolist()


def beam_params(**overrides) -> SamplingParams:
    settings = {"max_tokens": NEW_TOKENS, "temperature": 0.0, "beam_width": BEAM_WIDTH, "ignore_eos": True}
    settings.update(overrides)
    return SamplingParams(**settings)


@pytest.fixture(scope="module")
def reference_model():
    from molten.models import load_model

    return load_model("tiny-random-llama", dtype=torch.float32).model


def test_beams_match_transformers(tiny_llama, make_engine, reference_model):
    prompts = random_prompts(13, 3, 5, 40)
    engine = make_engine(tiny_llama, kv_block_size=4)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"beam-{index}", prompt, beam_params())
    outputs: dict[str, list[int]] = {f"beam-{index}": [] for index in range(len(prompts))}
    max_saved_blocks = 0
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished():
            break
        for event in engine.step():
            assert event.origin == "beam"
            outputs[event.request_id].append(event.token_id)
        engine.check_block_accounting()
        max_saved_blocks = max(max_saved_blocks, engine.block_manager.num_saved_blocks)
    assert not engine.has_unfinished()
    for index, prompt in enumerate(prompts):
        assert outputs[f"beam-{index}"] == reference_beam_search(reference_model, prompt)
    # Beam search must differ from greedy somewhere, or the comparison above proves little.
    greedy = run_to_completion(make_engine(tiny_llama), prompts, greedy_params(NEW_TOKENS)).outputs()
    assert greedy != [outputs[f"beam-{index}"] for index in range(len(prompts))]
    assert max_saved_blocks > 0
    assert engine.num_forked_blocks_shared > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_beam_search_abort_frees_blocks(tiny_llama, make_engine):
    engine = make_engine(tiny_llama, kv_block_size=4)
    engine.add_request("beam", random_prompts(17, 1, 20, 20)[0], beam_params(max_tokens=30))
    for _ in range(4):
        engine.step()
    assert len(engine.sequences["beam"]) == BEAM_WIDTH
    assert engine.abort_request("beam")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished()


def test_beam_width_validation():
    with pytest.raises(SamplingParamsError) as error:
        SamplingParams(beam_width=2, temperature=1.0)
    assert error.value.field == "beam_width"
    with pytest.raises(SamplingParamsError):
        SamplingParams(beam_width=21, temperature=0.0)
    with pytest.raises(SamplingParamsError):
        SamplingParams(beam_width=2, temperature=0.0, n=2)


def test_beam_search_leaves_no_output_state(tiny_llama, make_engine):
    # Finished or dropped beams must release their detokenizer state, or a long-lived engine grows.
    engine = make_engine(tiny_llama, kv_block_size=4)
    for index, prompt in enumerate(random_prompts(19, 3, 5, 30)):
        engine.add_request(f"beam-{index}", prompt, beam_params())
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished():
            break
        engine.step()
    assert not engine.has_unfinished()
    assert engine.outputs == {}
    assert engine.sequences == {}
