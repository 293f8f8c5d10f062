"""Training: one loop and its callers.

    loop.py      the runtime (device, DDP), optimizers, schedule, and `run_steps`, the stage loop
                 (refuse or resume, metrics, checkpoints, done.json); `train`, its next-token step
    muon.py      the Muon optimizer for the hidden matrices
    pretrain.py  token shards -> base/ (next-token training from random weights)
    sft.py       conversations -> sft/ (the same loop; the loss on the assistant's tokens)
    rl.py        verifiable problems -> rl/ (sample groups, reward, policy gradient: the loop's step)
    rm.py        preference pairs -> rm/ (the reward model: a scalar head, Bradley-Terry loss)
    dpo.py       preference pairs -> dpo/ (Direct Preference Optimisation against the SFT model)
    rlhf.py      open prompts + rm/ -> rlhf/ (rl.py's loop rewarded by the reward model, KL to SFT)
"""
