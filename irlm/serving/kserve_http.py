from fastapi import APIRouter
class KServeHTTP:
    def __init__(self, client, cfg): pass
    def router(self): return APIRouter()
