"""A tiny stand-in for WebShop's WebAgentTextEnv: the same methods the adapter calls, a handful of
products, search, item pages with options, buy, and WebShop's attribute/option/price reward."""

PRODUCTS = {
    "b0001": dict(name="red cotton t-shirt", category="shirt", price=12.0, attributes=["cotton", "machine wash"],
                  options={"size": ["small", "large"], "color": ["red", "blue"]}),
    "b0002": dict(name="blue denim jeans", category="jeans", price=40.0, attributes=["denim", "slim fit"],
                  options={"size": ["30", "32"]}),
    "b0003": dict(name="green wool t-shirt", category="shirt", price=55.0, attributes=["wool"],
                  options={"size": ["small", "large"]}),
}


def goal(i):
    asin = ("b0001", "b0002", "b0003")[i % 3]
    p = PRODUCTS[asin]
    opts = [v[0] for v in p["options"].values()]
    return dict(asin=asin, category=p["category"], attributes=p["attributes"][:1], goal_options=opts,
                price_upper=50.0, instruction_text=f"i need a {p['name']} in {' and '.join(opts)}, under 50 dollars")


class Server:
    def __init__(self, n_goals):
        self.goals = [goal(i) for i in range(n_goals)]


class FakeWebShop:
    def __init__(self, n_goals=600):
        self.server = Server(n_goals)

    def reset(self, session):
        self.goal = self.server.goals[session]
        self.page, self.item, self.chosen, self.results = "search", None, {}, []
        return self._obs(), None

    def get_instruction_text(self):
        return f"Instruction: [SEP] {self.goal['instruction_text']}"

    def get_available_actions(self):
        if self.page == "search":
            return dict(has_search_bar=True, clickables=["search"])
        if self.page == "results":
            return dict(has_search_bar=False, clickables=["back to search"] + self.results)
        opts = [o for vals in PRODUCTS[self.item]["options"].values() for o in vals]
        return dict(has_search_bar=False, clickables=["back to search", "< prev"] + opts + ["buy now"])

    def step(self, action):
        if action.startswith("search[") and self.page == "search":
            words = set(action[7:-1].split())
            self.results = [a for a, p in PRODUCTS.items() if words & set(p["name"].split())]
            self.page = "results"
        elif action.startswith("click[") and action[6:-1] in self.get_available_actions()["clickables"]:
            label = action[6:-1]
            if label == "back to search":
                self.page = "search"
            elif label == "< prev":
                self.page = "results"
            elif label in PRODUCTS:
                self.page, self.item, self.chosen = "item", label, {}
            elif label == "buy now":
                return self._obs(), self._reward(), True, None
            else:
                kind = next(k for k, v in PRODUCTS[self.item]["options"].items() if label in v)
                self.chosen[kind] = label
        return self._obs(), 0.0, False, None

    def _reward(self):
        """WebShop's score: r_type · (attribute matches + option matches + price ok) / (n_attr + n_opt + 1)."""
        p, g = PRODUCTS[self.item], self.goal
        r_type = 1.0 if p["category"] == g["category"] else 0.5
        attrs = sum(a in p["attributes"] for a in g["attributes"])
        opts = sum(o in self.chosen.values() for o in g["goal_options"])
        price = float(p["price"] <= g["price_upper"])
        return r_type * (attrs + opts + price) / (len(g["attributes"]) + len(g["goal_options"]) + 1)

    def _obs(self):
        head = f"WebShop [SEP] Instruction: [SEP] {self.goal['instruction_text']}"
        if self.page == "search":
            return head + " [SEP] Search"
        if self.page == "results":
            return head + " [SEP] Back to Search [SEP] " + " [SEP] ".join(
                f"{a} [SEP] {PRODUCTS[a]['name']} [SEP] ${PRODUCTS[a]['price']}" for a in self.results)
        p = PRODUCTS[self.item]
        return head + f" [SEP] Back to Search [SEP] < Prev [SEP] {p['name']} [SEP] Price: ${p['price']} [SEP] Buy Now"
