import sys, time, torch
sys.path.insert(0, "bench"); sys.path.insert(0, ".")
from optimizer import gpt2_sized_tokenizer, SUBJECTS
from transformers import GPT2Config, GPT2LMHeadModel
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
tok = gpt2_sized_tokenizer(); tok.pad_token = tok.eos_token; tok.padding_side = "left"
torch.manual_seed(0)
m = GPT2LMHeadModel(GPT2Config()).eval()
enc = tok([s + " Rephrase:" for s in SUBJECTS], return_tensors="pt", padding=True)
kw = dict(num_beams=8, max_new_tokens=12, length_penalty=-1.0, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
from torch.profiler import profile, ProfilerActivity
with torch.inference_mode():
    m.generate(**enc, **{**kw, "max_new_tokens": 2})
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        m.generate(**enc, **kw)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
