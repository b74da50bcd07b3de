# placeholder: replaced by the real codec
class FrameError(ValueError): pass
class BatchEncoder: pass
class FrameDecoder: pass
