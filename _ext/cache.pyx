# placeholder: replaced by the real TTL cache
class TTLCache: pass
