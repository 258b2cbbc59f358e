"""``--target-format gguf-TYPE``: quantize each Linear of a llama model on the grid of the llama.cpp block type
``llama-quantize`` would give it, so that the GGUF export holds the solver's codes as they are.

A target is one block type for every Linear (``gguf-q4_0``, ``gguf-q4_k``, ...) or a mix (``gguf-q4_k_m``), and
the rules are llama.cpp's (``llama_tensor_get_type`` in ``src/llama-quant.cpp`` of the llama.cpp that
llama-cpp-python 0.3.36 ships), restricted to dense llama models:
- a single type (``gguf-q4_k``) is every Linear in that type, as ``llama-quantize --pure``;
- Q4_K_M: attn_v and ffn_down in Q6_K on the layers ``use_more_bits`` picks (the first and last eighth, and every
  third in between), Q4_K everywhere else; on a 70B model (80 layers) the other attn_v in Q5_K;
- a K type needs rows of whole 256-column super-blocks; where a Linear's input is narrower or not a multiple,
  llama.cpp falls back per tensor (Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q6_K -> Q8_0), and so does quantlm; where it
  is not a multiple of 32 either, the Linear stays float (llama.cpp writes F16 there).
The token embedding and the output projection stay as the model has them (llama-quantize's
``--token-embedding-type`` / ``--output-tensor-type`` set them there); the GGUF export writes them as floats.
"""

from __future__ import annotations

from quantlm.core.spec import SUPER_BLOCK
from quantlm.errors import QuantlmError
from quantlm.formats.gguf import ARCHITECTURES, LLAMA_NAMES
from quantlm.formats.gguf_blocks import GRIDS, is_k_type

TYPES = ("Q4_0", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q6_K")  # one type for every Linear
MIXES = ("Q4_K_M",)
TARGETS = {f"gguf-{t.lower()}": t for t in (*TYPES, *MIXES)}
LLAMA_70B_LAYERS = 80  # how llama.cpp knows a 70B llama (LLM_TYPE_70B)
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q6_K": "Q8_0"}  # for rows of partial super-blocks


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in the _M mixes."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def chosen_type(target: str, category: str, layer: int, n_layers: int) -> str:
    """The block type ``target`` gives llama.cpp's tensor ``category`` of decoder layer ``layer``."""
    if target == "Q4_K_M":
        if category in ("attn_v", "ffn_down") and use_more_bits(layer, n_layers):
            return "Q6_K"
        if category == "attn_v" and n_layers == LLAMA_70B_LAYERS:  # 8 heads share attn_v: more bits, little size
            return "Q5_K"
        return "Q4_K"
    return target


def target_name(target: str) -> str:
    """The llama.cpp type or mix a ``--target-format`` value names, or a one-line error listing them."""
    if target not in TARGETS:
        raise QuantlmError(f"unknown --target-format {target!r}: use one of {', '.join(TARGETS)}")
    return TARGETS[target]


def layer_types(blocks: list[dict[str, int]], target: str) -> dict[tuple[int, str], str | None]:
    """``blocks``: per decoder layer, its Linears' local names -> input features. Returns the block type of each
    ``(layer, local name)``, with llama.cpp's fallback where a K type's super-blocks do not fit the rows (None: no
    block type fits; the Linear stays float)."""
    mix = target_name(target)
    types = {}
    for layer, linears in enumerate(blocks):
        for local, in_features in linears.items():
            category = LLAMA_NAMES.get(local)
            if category is None:
                raise QuantlmError(
                    f"--target-format {target} knows the Linears of llama decoder blocks, not {local!r}: quantize "
                    "this model with --bits/--group-size and export it as gptq or compressed-tensors"
                )
            kind = chosen_type(mix, category, layer, len(blocks))
            if is_k_type(kind) and in_features % SUPER_BLOCK:
                kind = FALLBACK[kind]
            types[(layer, local)] = None if in_features % GRIDS[kind].group_size else kind
    return types


def describe_types(types: dict, blocks: list[dict[str, int]], target: str) -> str:
    """One line on what ``layer_types`` chose: how many Linears in each type, the fallbacks named as such."""
    mix = target_name(target)
    counts: dict[str, int] = {}
    for (layer, local), kind in types.items():
        wanted = chosen_type(mix, LLAMA_NAMES[local], layer, len(blocks))
        label = "float" if kind is None else kind
        if kind != wanted:
            label += f" (for {wanted}: {blocks[layer][local]} input columns)"
        counts[label] = counts.get(label, 0) + 1
    return f"{target}: " + ", ".join(f"{n} x {label}" for label, n in counts.items())


def input_widths(blocks) -> list[dict[str, int]]:
    """Per decoder block (``quantlm.models.blocks.DecoderBlocks``), its Linears' local names -> input features."""
    from quantlm.models.blocks import linear_weight, quantizable_linears

    return [{local: linear_weight(m).shape[1] for local, m in quantizable_linears(b).items()} for b in blocks.blocks]


def describe_target(model, target: str) -> str:
    """One line on the types ``target`` gives ``model``'s Linears (fallbacks named)."""
    from quantlm.models.blocks import find_decoder_blocks

    widths = input_widths(find_decoder_blocks(model))
    return describe_types(layer_types(widths, target), widths, target)


def target_recipe(recipe, model, target: str):
    """``recipe`` (one rtn or gptq weight step) with each Linear of ``model``'s decoder blocks (a model or its
    meta-device skeleton) on the grid of the block type ``target`` gives it."""
    import dataclasses

    from quantlm.methods.recipe import Recipe, per_layer_grids
    from quantlm.models.blocks import find_decoder_blocks

    problem = target_recipe_problem(recipe)
    if problem is not None:
        raise QuantlmError(f"--target-format {target}: {problem}")
    if model.config.model_type not in ARCHITECTURES:
        raise QuantlmError(
            f"--target-format {target} is for llama-architecture models (llama, mistral), not "
            f"{model.config.model_type}: quantize with --bits/--group-size and export as gptq or compressed-tensors"
        )
    blocks = find_decoder_blocks(model)
    widths = input_widths(blocks)
    types = layer_types(widths, target)
    names = {(i, local): f"{blocks.name(i)}.{local}" for i, b in enumerate(widths) for local in b}
    grids = {names[key]: GRIDS[kind] for key, kind in types.items() if kind is not None}
    stay_float = tuple(names[key] for key, kind in types.items() if kind is None)  # rows no block type fits
    if stay_float:
        step = recipe.steps[0]
        recipe = Recipe([dataclasses.replace(step, exclude=(*step.exclude, *stay_float))])
    return per_layer_grids(recipe, grids)


def target_recipe_problem(recipe) -> str | None:
    """Why ``recipe`` cannot make a model that GGUF's blocks hold (None: it can)."""
    if len(recipe.steps) != 1 or recipe.steps[0].name not in ("rtn", "gptq"):
        return f"quantize with --method rtn or gptq alone (this recipe is {recipe.describe()})"
    step = recipe.steps[0]
    if step.act_bits is not None:
        return "llama.cpp's blocks quantize weights only: drop --a-bits"
    if getattr(step, "lm_head", False):
        return "the GGUF export keeps the output projection float: drop --lm-head"
    if getattr(step, "act_order", False) and not getattr(step, "static_groups", True):
        return "llama.cpp's blocks keep columns in order: drop --no-static-groups (act-order with static groups works)"
    return None
