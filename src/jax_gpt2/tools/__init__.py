"""The developer's tools, apart from the library: what `jax-gpt2 compare`, `bench`, `random-model`
and `remote` run. Nothing in the model, inference or serving code imports from here.

    compare.py       side-by-side logits against transformers
    bench.py         side-by-side speed against transformers (and llama.cpp), bandwidth roofline
    llama_cpp.py     llama.cpp's llama-bench on GGUF conversions of the bench's weights
    random_model.py  a random-weight checkpoint folder (the tests' and benchmarks' models)
    remote.py        the suite or a bench on a rented GPU over ssh (RunPod provisioning), as one plan
    ssh.py           remote's ssh and rsync command lines, and running them unattended
    runpod.py        remote's RunPod REST client: create a pod, wait for its SSH address, delete it

They ship in the wheel because the CLI offers them (a user checks parity and speed on their own
machine with the same commands the project uses); they import torch and transformers only
when they run.
"""
