"""llm: the llmpipe library — tokenizer, data steps, GPT model, training, finetuning, judging.

Plain PyTorch / pyarrow / pandas; never imports prefect or mlflow (that is flows/'s job),
so everything here can be used from a notebook:

    from llm.model import GPT, GPTConfig
    from llm.tokenizer import get_encoding
"""
__version__ = "0.1.0"
