# placeholder: replaced by the real topic trie
class TopicTrie: pass
def parse_shared(f): raise NotImplementedError
def validate_filter(f): raise NotImplementedError
def validate_topic(t): raise NotImplementedError
