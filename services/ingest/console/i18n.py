"""The console's words in Chinese (zh-CN) and English: `text(lang, key)`.

The language is the `huitou_lang` cookie (set by the switch in the header), else the
browser's `Accept-Language` (Chinese first if it asks for any `zh`), else Chinese."""

from __future__ import annotations

LANGS = ("zh-CN", "en")

STAGES = {
    "prospect": ("潜在", "Prospect"),
    "interested": ("兴趣", "Interested"),
    "new": ("新客", "New"),
    "after_sale": ("售后", "After sale"),
    "active": ("活跃", "Active"),
    "silent": ("沉默", "Silent"),
    "sleeping": ("沉睡", "Sleeping"),
    "churned": ("流失", "Churned"),
}

WORDS: dict[str, tuple[str, str]] = {
    "brand": ("惠投 Huitou", "Huitou"),
    "sign_in": ("登录", "Sign in"),
    "sign_out": ("退出", "Sign out"),
    "key": ("API 密钥", "API key"),
    "key_help": (
        "店铺密钥，或管理员密钥加店铺 ID。密钥只保存在服务器端。",
        "A shop key, or the admin key with a shop id. The key stays on the server.",
    ),
    "shop_id": ("店铺 ID（管理员密钥时填写）", "Shop id (with the admin key)"),
    "bad_key": ("密钥无效或已吊销", "Unknown or revoked key"),
    "need_shop": ("管理员密钥需要填写店铺 ID", "The admin key needs a shop id"),
    "expired": ("请重新登录", "Please sign in again"),
    "overview": ("概览", "Overview"),
    "customers": ("客户", "Customers"),
    "tags": ("标签与分群", "Tags & segments"),
    "journeys": ("旅程", "Journeys"),
    "messages": ("消息", "Messages"),
    "promotions": ("大促", "Promotions"),
    "funnel": ("客户阶段漏斗", "Customers by stage"),
    "funnel_help": (
        "每个阶段的客户数；点击阶段查看客户。",
        "Customers in each stage; click a stage to see them.",
    ),
    "returning_share": ("老客占比", "Returning share"),
    "returning_share_help": (
        "近 365 天购买的客户中，购买超过一次的比例",
        "Buyers of the last 365 days who bought more than once",
    ),
    "aov_new": ("新客客单价", "New customers' AOV"),
    "aov_returning": ("老客客单价", "Returning customers' AOV"),
    "aov_help": ("每单平均金额", "Average order value"),
    "buyers_365d": ("近 365 天购买客户", "Buyers, last 365 days"),
    "new_customers_7d": ("近 7 天新客", "New customers, last 7 days"),
    "members": ("会员", "Members"),
    "interested_30d": ("近 30 天兴趣客户", "Interested, last 30 days"),
    "previous": ("上一周期", "Previous period"),
    "repurchase_cycle": ("复购周期（天）", "Repurchase cycle (days)"),
    "repurchase_cycle_help": (
        "同一客户相邻两次购买间隔的分位数",
        "Percentiles of days between a customer's consecutive purchases",
    ),
    "repurchase_rate": ("各阶段复购率", "Repurchase rate by stage"),
    "stage": ("阶段", "Stage"),
    "all": ("全部", "All"),
    "search": ("搜索", "Search"),
    "name": ("姓名", "Name"),
    "phone": ("手机", "Phone"),
    "email": ("邮箱", "Email"),
    "level": ("会员等级", "Level"),
    "recency": ("最近购买（天前）", "Last purchase (days ago)"),
    "frequency": ("购买次数", "Purchases"),
    "monetary": ("消费金额", "Spent"),
    "p_alive": ("存活概率", "P(alive)"),
    "next_purchase": ("预计下次购买", "Next purchase"),
    "prediction": ("复购预测", "Repurchase prediction"),
    "no_prediction": ("店铺尚无复购模型", "The shop has no repurchase model yet"),
    "orders": ("订单", "Orders"),
    "timeline": ("时间线", "Timeline"),
    "consent": ("营销许可", "Consent"),
    "next_page": ("下一页", "Next page"),
    "none": ("无", "None"),
    "new_journey": ("从模板新建旅程", "New journey from a playbook"),
    "playbook": ("模板", "Playbook"),
    "create": ("创建并启用", "Create and activate"),
    "status": ("状态", "Status"),
    "version": ("版本", "Version"),
    "pause": ("暂停", "Pause"),
    "resume": ("恢复", "Resume"),
    "archive": ("归档", "Archive"),
    "steps": ("步骤", "Steps"),
    "waiting": ("等待中", "Waiting"),
    "entered": ("进入", "Entered"),
    "held_out": ("对照组", "Held out"),
    "exited": ("退出原因", "Exited, by reason"),
    "conversions": ("转化", "Conversions"),
    "lift": ("提升（95% 区间）", "Lift (95% interval)"),
    "channel": ("渠道", "Channel"),
    "template": ("模板", "Template"),
    "to": ("收件人", "To"),
    "provider": ("服务商", "Provider"),
    "reason": ("原因", "Reason"),
    "history": ("状态历史", "Status history"),
    "at": ("时间", "At"),
    "filter": ("筛选", "Filter"),
    "customer": ("客户", "Customer"),
    "forecast": ("老客订单预测", "Returning-customer orders forecast"),
    "from": ("开始", "From"),
    "until": ("结束", "To"),
    "expected": ("预计", "Expected"),
    "interval": ("95% 区间", "95% interval"),
    "actual": ("实际", "Actual"),
    "error": ("出错了", "Something went wrong"),
    "count": ("人数", "Count"),
    "rule": ("规则", "Rule"),
    "segments": ("分群", "Segments"),
    "templates": ("消息模板", "Templates"),
    "channels": ("渠道设置", "Channels"),
    "locales": ("语言", "Locales"),
    "subject": ("主题", "Subject"),
    "text": ("正文", "Text"),
    "preview": ("预览（示例变量）", "Preview (sample values)"),
    "encoding": ("编码", "Encoding"),
    "characters": ("计费字数（含签名）", "Billed characters (signature included)"),
    "provider_templates": ("服务商模板映射", "Provider templates"),
    "save": ("保存", "Save"),
    "dry_run": ("试运行", "Dry run"),
    "dry_run_help": (
        "看一个事件会让这位客户走哪条路径、发出哪些消息；不保存、不发送。",
        "The path an event would take this customer along and the messages it would send; "
        "nothing is stored or sent.",
    ),
    "event": ("事件（JSON）", "Event (JSON)"),
    "builder": ("分群规则", "Segment rule"),
    "builder_help": (
        "所填条件须同时满足；人数随修改实时更新。",
        "Every condition given must hold; the count follows as you change them.",
    ),
    "has_tag": ("带标签", "Has tag"),
    "city": ("城市", "City"),
    "min_frequency": ("购买次数至少", "Purchases at least"),
    "max_recency_days": ("最近购买不超过（天）", "Last purchase within (days)"),
    "min_spent": ("消费金额至少（元）", "Spent at least (yuan)"),
    "max_p_alive": ("存活概率不超过", "P(alive) at most"),
    "live_count": ("符合人数", "Customers matching"),
    "segment_name": ("分群名称", "Segment name"),
    "save_segment": ("保存分群", "Save segment"),
    "export": ("导出", "Export"),
    "sms_segments": ("计费条数", "Billed segments"),
    "settings": ("设置（JSON）", "Settings (JSON)"),
    "credentials_help": (
        "密钥、密码只写不读：修改设置时需重新填写。",
        "Credentials are write-only: enter them again whenever you change the settings.",
    ),
    "language": ("English", "中文"),
}


def text(lang: str, key: str) -> str:
    zh, en = WORDS.get(key) or STAGES.get(key) or (key, key)
    return zh if lang == "zh-CN" else en


def choose(cookie: str | None, accept: str | None) -> str:
    if cookie in LANGS:
        return cookie
    if accept and "en" in accept.lower() and "zh" not in accept.lower():
        return "en"
    return "zh-CN"
