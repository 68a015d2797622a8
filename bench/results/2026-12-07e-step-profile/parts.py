import json,sys
def parts(path, peak):
    d=json.load(open(path))
    step=d['step_ms']
    g=[x for x in d['gemms'] if x['name'] in ('aten::mm','aten::addmm') and not x['one_thread']]
    gms=sum(x['ms'] for x in g)
    def fl(x):
        a,b=x['dims'][-2:] if x['name']=='aten::mm' else x['dims'][1:3]
        return 2*a[0]*a[1]*b[1]*x['calls']/1e9
    gfl=sum(fl(x) for x in g)
    R={r['name']:r for r in d['parallel_regions']}
    def reg(*keys):
        ms=0;gf=0
        for n,r in R.items():
            if any(k in n for k in keys): ms+=r['ms']; gf+=r['gflop']
        return ms,gf
    ex=reg('GroupedSwiGLU','grouped_swiglu'); at=reg('CausalAttentionCpu','causal_attention'); ce=reg('cross_entropy','CrossEntropy')
    ops=d['operators']
    def op(*names): return sum(o['ms'] for o in ops if o['name'] in names)
    adam=op('aten::_fused_adamw_','yuanmoe::squared_gradient_sum','aten::_foreach_add_')
    router=op('yuanmoe::expert_attention','torch::autograd::CppNode<yuanmoe::model::(anonymous namespace)::ExpertAttentionCpu>')
    rest=step-gms-ex[0]-at[0]-ce[0]-adam-router
    print(path)
    print('step %.1f'%step)
    print('large GEMMs %.1f ms %.1f GFLOP %.0f GFLOP/s %.0f%%'%(gms,gfl,gfl/gms*1e3,gfl/gms*1e3/peak*100))
    print('experts %.1f ms %.2f GFLOP %.0f GFLOP/s %.0f%%'%(ex[0],ex[1],ex[1]/ex[0]*1e3,ex[1]/ex[0]*1e3/peak*100))
    print('attention %.1f ms %.2f GFLOP %.0f GFLOP/s %.0f%%'%(at[0],at[1],at[1]/at[0]*1e3,at[1]/at[0]*1e3/peak*100))
    print('CE %.1f  adamw+norm(+clip) %.1f  router %.1f  rest %.1f'%(ce[0],adam,router,rest))
parts(sys.argv[1], float(sys.argv[2]))
