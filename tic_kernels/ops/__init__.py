"""The ops, one module each, named for the public function it defines: the function that checks
its arguments and dispatches to the kernels or to tic_kernels.reference, its torch.library
op, and the Triton kernels it owns with their launchers (tic_loss.py chains op 1's kernels,
token_logprobs.py, and op 4's, ratio_loss_kernels.py; the LM head's modules chain the same
around their GEMMs; packing.py's kernels are the C++/CUDA extension's):

    token_logprobs.py     op 1   token_logprobs            (and op 1 over a vocabulary shard)
    sequence_logprobs.py  op 2   sequence_logprobs
    group_advantages.py   op 3   group_advantages
    ratio_loss.py         op 4   tic_loss_from_logprobs    (its kernels: ratio_loss_kernels.py,
                                                            their objectives: ratio_objectives.py)
    tic_loss.py           op 4   tic_loss                  (logits -> loss in one node)
    tic_loss_two_pass.py  op 4   tic_loss, token ratios    (the gradient in the forward: a switch)
    packing.py            op 5   pack / unpack             (the C++/CUDA extension)
    lm_head.py            op 6   linear_token_logprobs     (the fused LM head's chunks)
    lm_head_loss.py       op 6   linear_tic_loss
    vocab_parallel.py     op 7   combining the vocabulary shards' partial values

This package re-exports nothing: ``tic_kernels`` does (``tic_kernels.tic_loss`` is the
function, ``tic_kernels.ops.tic_loss`` its module).
"""
