import time

import torch

import trl_selfdistill.losses as L
from trl_selfdistill.losses import LMHead, TeacherTarget, fused_token_losses

d="cuda"; V,H=151936,1536
for N in (4096,8192):
  for ac in (False,True):
    g=torch.Generator(device=d).manual_seed(0)
    W=torch.randn(V,H,device=d)*0.02; Wt=W.clone()
    h=torch.randn(N,H,device=d,requires_grad=True); ht=torch.randn(N,H,device=d)
    tg=torch.randint(0,V,(N,),device=d); w=torch.full((N,),1.0/N,device=d)
    def f():
      with torch.autocast("cuda",dtype=torch.bfloat16,enabled=ac):
        out=fused_token_losses(h,LMHead(W),tg,TeacherTarget(ht,LMHead(Wt)),w,w,beta=0.0,temperature=0.5)
      out.loss.backward()
    f(); torch.cuda.synchronize(); t=time.perf_counter()
    for _ in range(3): f()
    torch.cuda.synchronize(); print("fused N",N,"autocast",ac,(time.perf_counter()-t)/3, flush=True)
    def naive():
      with torch.autocast("cuda",dtype=torch.bfloat16,enabled=ac):
        z=(h@W.t()).float()
        with torch.no_grad(): lt=torch.log_softmax((ht@Wt.t()).float()/0.5,-1)
        loss=torch.nn.functional.cross_entropy(z,tg)+(lt.exp()*(lt-torch.log_softmax(z/0.5,-1))).sum()/N
      loss.backward()
    naive(); torch.cuda.synchronize(); t=time.perf_counter()
    for _ in range(3): naive()
    torch.cuda.synchronize(); print("naive N",N,"autocast",ac,(time.perf_counter()-t)/3, flush=True)
print("budget", getattr(L,"FUSED_BUDGET_BYTES",None))
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
  with torch.autocast("cuda",dtype=torch.bfloat16):
    out=fused_token_losses(h,LMHead(W),tg,TeacherTarget(ht,LMHead(Wt)),w,w,beta=0.0,temperature=0.5)
  out.loss.backward(); torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total",row_limit=12))
