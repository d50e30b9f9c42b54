/**
 * Entry point of hafen-widget.js, embedded by a tenant's website with
 * `<script src="…/widget/hafen-widget.js" data-widget="<widget id>" data-endpoint="…" defer>`.
 *
 * The script finds its own tag through document.currentScript, which is set only while the
 * script's top level runs (with or without `defer`), so it is read first, synchronously. The
 * stylesheet sits next to the script (same URL, `.css`). At load the widget only draws its
 * launcher and reads whether there is a chat to continue (this tab's, or one remembered on this
 * device): no call to the service and no write to storage happen before the visitor opens the
 * chat.
 */

import { connect } from "./client";
import { pickLanguage, strings, visitorLanguages } from "./i18n";
import { mountShell } from "./shell";
import { readStored } from "./store";
import { Visit } from "./visit";

const script = document.currentScript;

boot();

function boot(): void {
  if (!(script instanceof HTMLScriptElement) || !script.src) {
    console.error("hafen-widget: load it with <script src=… data-widget=…>");
    return;
  }
  const widgetId = script.dataset["widget"] ?? "";
  if (widgetId === "") {
    console.error("hafen-widget: the script tag needs data-widget=\"<widget id>\"");
    return;
  }
  const src = new URL(script.src, document.baseURI);
  // Without data-endpoint the service is where the script came from.
  const endpoint = (script.dataset["endpoint"] || src.origin).replace(/\/+$/, "");
  const css = new URL(src.href);
  css.pathname = css.pathname.replace(/\.js$/, ".css");

  const mount = () => {
    const lang = pickLanguage(visitorLanguages());
    const api = connect(endpoint, widgetId);
    let visit: Visit | null = null;
    const shell = mountShell(css.href, strings(lang), lang, {
      onOpen: () => visit?.opened(),
      onMyData: () => visit?.myData(),
    });
    visit = new Visit(shell, api, widgetId);
    shell.setResume(readStored(widgetId) !== null);
  };
  if (document.body) {
    mount();
  } else {
    document.addEventListener("DOMContentLoaded", mount, { once: true });
  }
}
