import torch, time, statistics
torch.set_num_threads(2)
torch.manual_seed(0)
# tiny-m32's parameter shapes, roughly: embedding, 4 layers of attention/LFA/router + experts
shapes=[(8192,256)]+[(32,512,256),(32,256,256),(1024,256),(256,512),(256,256),(256,256),(96,256),(256,),(256,)]*4
def make():
    ps=[torch.randn(s) for s in shapes]; gs=[torch.randn(s) for s in shapes]
    ms=[torch.zeros(s) for s in shapes]; vs=[torch.zeros(s) for s in shapes]; st=[torch.tensor(1.0) for s in shapes]
    return ps,gs,ms,vs,st
A=make(); B=make()
scale=torch.tensor(6.3)
def mul_then_adam():
    ps,gs,ms,vs,st=A
    for g in gs: g.mul_(1/6.3)
    torch._fused_adamw_(ps,gs,ms,vs,[],st,lr=1e-3,beta1=0.9,beta2=0.95,weight_decay=0.1,eps=1e-8,amsgrad=False,maximize=False)
def adam_scale():
    ps,gs,ms,vs,st=B
    torch._fused_adamw_(ps,gs,ms,vs,[],st,lr=1e-3,beta1=0.9,beta2=0.95,weight_decay=0.1,eps=1e-8,amsgrad=False,maximize=False,grad_scale=scale)
def adam_only():
    ps,gs,ms,vs,st=A
    torch._fused_adamw_(ps,gs,ms,vs,[],st,lr=1e-3,beta1=0.9,beta2=0.95,weight_decay=0.1,eps=1e-8,amsgrad=False,maximize=False)
V=[('mul_ + adamw',mul_then_adam),('adamw(grad_scale)',adam_scale),('adamw alone',adam_only)]
res={n:[] for n,_ in V}
for r in range(25):
    for n,f in V:
        a=time.perf_counter(); f(); res[n].append(time.perf_counter()-a)
for n,_ in V: print('%-20s median %.2f ms  (min %.2f)'%(n,statistics.median(res[n][3:])*1e3,min(res[n])*1e3))
print('params', sum(torch.Size(s).numel() for s in shapes)/1e6,'M')
