"""Tensor parallelism (frugal.integrations.transformers.tensor_parallel): two gloo processes on
CPU, each holding half the heads and MLP columns, give the greedy tokens of the whole model."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers", minversion="5")
pytestmark = pytest.mark.usefixtures("one_thread")

import frugal  # noqa: E402
from frugal.integrations import transformers as ft  # noqa: E402

# Llama (q/k/v/o), Phi-3 (fused qkv and gate_up) and Qwen2 (q/k/v biases, a windowed layer).
FAMILIES = ("llama", "phi3", "qwen2")
PROMPTS = [[5, 6, 7, 8, 9], list(range(3, 40)), [11] * 17]
PARAMS = ft.SamplingParams(max_new_tokens=10, stop_token_ids=())


def _rank(rank, world, init, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results = {}
        for family in FAMILIES:
            model = ft.tensor_parallel(ft.tiny_model(family))
            attn = ft.attention.attention_layers(model)[0]
            results[family, "kv_heads"] = model.config.num_key_value_heads
            results[family, "o_proj"] = type(attn.o_proj).__name__
            results[family] = [c.token_ids for c in ft.generate(model, PROMPTS, PARAMS)]
        odd = ft.tiny_model("llama", hidden_size=96, num_attention_heads=3,
                            num_key_value_heads=3)
        try:
            ft.tensor_parallel(odd)
        except frugal.ShapeError as e:
            results["error"] = str(e)
        odd_mlp = ft.tiny_model("llama", intermediate_size=191)
        try:
            ft.tensor_parallel(odd_mlp)
        except frugal.ShapeError as e:  # refused before any layer is split
            q_proj = ft.attention.attention_layers(odd_mlp)[0].q_proj
            results["mlp_error"] = str(e), q_proj.out_features
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_greedy_tokens_of_the_whole_model(tmp_path):
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for family in FAMILIES:
        whole = [c.token_ids for c in ft.generate(ft.tiny_model(family), PROMPTS, PARAMS)]
        for got in ranks:
            assert got[family] == whole
            assert got[family, "kv_heads"] == 1 and got[family, "o_proj"] == "RowParallelLinear"
    assert ranks[0]["error"] == ("tensor_parallel: num_key_value_heads 3 must be a multiple of "
                                 "the world size 2 (each rank keeps whole GQA groups)")
    assert ranks[0]["mlp_error"] == ("tensor_parallel: the MLP's intermediate size 191 must be "
                                     "a multiple of the world size 2", 128)
