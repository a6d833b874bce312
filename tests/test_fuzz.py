"""Property-based fuzzing: any model text goes through the whole turn pipeline (parse, boundary, token spans,
block masks, V_low position, reward shaping, advantage assignment) without an exception and with consistent
masks. Derandomised (a fixed seed), ~200 trajectories, a few seconds."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import demo
import envs
import hiper

TAGS = ["<switch>", "</switch>", "<subgoal>", "</subgoal>", "<action>", "</action>", "<SWITCH>", "</Action>",
        "<switch", "</", "<>", "<subgoal></subgoal>", "<action></action>"]
WORDS = ["KEEP", "SWITCH", "keep", "Switch", "MAYBE", "find a mug", "go to cabinet 1", "take mug 1 from desk 2",
         "search[red shirt]", "click[buy now]", "None", "]", ".", ")"]
SPACE = [" ", "\n", "\t", "  \n ", "\r\n"]
CJK = ["找", "杯子", "看"]
piece = st.one_of(st.sampled_from(TAGS), st.sampled_from(WORDS), st.sampled_from(SPACE), st.sampled_from(CJK),
                  st.text(max_size=8))  # any unicode, surrogates excluded by hypothesis
response = st.one_of(st.lists(piece, max_size=30).map("".join),
                     st.text(min_size=400, max_size=1500))  # a ramble of several hundred tokens


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer
    path = str(tmp_path_factory.mktemp("tiny"))
    demo.build_tiny(path, [envs.FORMAT_RULES, envs.SUBGOAL_RULES] + WORDS * 5 + TAGS * 5)
    return AutoTokenizer.from_pretrained(path)


@settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                                      HealthCheck.data_too_large])
@given(texts=st.lists(response, min_size=1, max_size=4), won=st.booleans(), adv=st.sampled_from(["hae", "gae"]))
def test_any_text_goes_through_the_turn_pipeline(tok, texts, won, adv):
    traj, spans_sub = [], []
    for t, raw in enumerate(texts):
        ids = tok(raw, add_special_tokens=False).input_ids + [tok.eos_token_id]  # as generated, EOS kept
        text = tok.decode(ids, skip_special_tokens=True)  # what the rollout parses
        for env in ("alfworld", "webshop"):
            action, valid, subgoal = envs.parse_response(text, env)
            assert isinstance(action, str) and isinstance(valid, bool) and isinstance(subgoal, str)
        spans, decoded = hiper.token_spans(tok, ids)
        masks = hiper.block_masks(spans, decoded)
        assert all(len(m) == len(ids) for m in masks.values()) and any(masks["action"])
        j = hiper.v_low_index(spans, decoded)
        assert 0 <= j < len(ids)
        spans_sub.append([i for i, keep in zip(ids, masks["subgoal"]) if keep])
        last = t == len(texts) - 1
        traj.append(dict(prompt=[0], response=ids, text=text, valid=valid, won=won and last, done=won and last,
                         boundary=t == 0 or envs.is_boundary(text), masks=masks, v_low_idx=j,
                         values=torch.randn(3)))
    rewards = hiper.shape_rewards(hiper.Config(), traj, spans_sub)
    assert len(rewards) == len(traj) and all(math.isfinite(r) for r in rewards)
    for turn, r in zip(traj, rewards):
        turn["reward"] = r
    for s in hiper.advantages(hiper.Config(adv=adv), [traj]):
        n = len(s["response"])
        assert s["adv"].shape == s["loss_mask"].shape == (n,) and torch.isfinite(s["adv"]).all()
        assert not s["adv"][~s["loss_mask"]].any() and s["loss_mask"].any()  # advantage only where the loss is
        assert torch.isfinite(s["returns"]).all() and s["value_mask"].shape == (3,)
