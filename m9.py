from cgidm.summary import summarize
from cgidm.config import AuthConfig
cfg=AuthConfig(prompt='x', metric='psnr')
rows=[{'id':'a','label':None,'psnr':100.0,'skipped_steps':0},{'id':'b','label':None,'psnr':100.0,'skipped_steps':0}]
rows+=[{'id':f'c{i}','label':'control','psnr':12.0,'skipped_steps':0} for i in range(3)]
s=summarize(rows,cfg)
import json; print(json.dumps(s['set_verdict'],indent=1))
