# placeholder: replaced by the real routing table
class RoutingTable: pass
