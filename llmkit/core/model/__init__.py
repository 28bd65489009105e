"""Layer 4, model: the network and what is swapped into it.

- ``transformer.py``: the decoder-only transformer (plain PyTorch, reads like the paper), its
  position-indexed KV cache, the one mask policy and batch padding;
- ``heads.py``: pooling and the classifier head;
- ``lora.py``: LoRA adapters by module swap;
- ``quantize.py``: int8 weights and the int8 twin;
- ``few_rows.py``: decoding's few-row products in the layout this machine reads fastest.

Rule: imports only the layers below; shapes commented on every reshape; padding never changes a
real token's result.
"""
