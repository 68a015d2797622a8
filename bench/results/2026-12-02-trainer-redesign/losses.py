import json,sys
def losses(path):
    out={}
    for line in open(path):
        j=json.loads(line)
        if j.get("split")=="valid": out[("valid",j["step"])]=j["loss"]
        else: out[("train",j["step"])]=(j["loss"],j["aux_loss"],j["grad_norm"])
    return out
a=losses(sys.argv[1]); b=losses(sys.argv[2])
same=all(a[k]==b.get(k) for k in a) and a.keys()==b.keys()
print(sys.argv[1], "vs", sys.argv[2], ":", "bit-identical" if same else "DIFFERENT", len(a), "entries")
if not same:
    for k in sorted(a, key=str):
        if a[k]!=b.get(k): print(" ",k,a[k],b.get(k))
